"""`arvision heptapod train` and `arvision sample`: train a generator on a token cache; sample PNG grids and an
ADM-format .npz (read directly by `arvision eval fid`)."""
from __future__ import annotations

import json
from pathlib import Path

from .train import _add_train_args, cmd_train


def cmd_sample(args) -> None:
    import torch

    from ..checkpoints import load_model
    from ..generate.outputs import class_labels, generate_images, save_grid, save_npz
    from ..generate.sample import SamplingConfig

    model = load_model(args.checkpoint, family="heptapod", ema=args.ema)
    tokenizer, scale = _tokenizer(args, model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = model.to(device).eval(), tokenizer.to(device).eval()
    n_cls = model.config.num_classes
    classes = [int(c) for c in args.classes.split(",")] if args.classes else list(range(n_cls))
    bad = [c for c in classes if not 0 <= c < n_cls]
    if bad:
        raise ValueError(f"class indices {bad} are out of range for a generator of {n_cls} classes")
    labels = class_labels(classes, args.num_per_class, args.seed)
    cfg = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         diffusion_steps=args.diffusion_steps, diffusion_temperature=args.diffusion_temperature,
                         diffusion_variance=args.diffusion_variance, cfg_scale=args.cfg, use_cache=not args.no_cache,
                         precision=args.precision)
    images = generate_images(model, tokenizer, labels, cfg, args.batch_size, args.seed, scale)
    out = Path(args.out)
    files = {"npz": str(save_npz(images, labels, out / "samples.npz")),
             "grid": str(save_grid(images, labels, out / "samples.png", per_row=min(args.num_per_class, 16)))}
    meta = dict(vars(args), **files, num_samples=int(labels.shape[0]))
    meta.pop("func", None)
    (out / "sample.json").write_text(json.dumps(meta, indent=2, default=str))
    print(f"wrote {labels.shape[0]} samples: {files['grid']}, {files['npz']}")


def _tokenizer(args, model):
    """The tokenizer given by --tokenizer, else the one recorded in the generator's run (its token cache)."""
    from ..models.tokenizers import load_tokenizer

    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
        return tok, args.scale_factor if args.scale_factor is not None else tok.scale_factor
    run_cfg = next((p / "config.yaml" for p in Path(args.checkpoint).resolve().parents if (p / "config.yaml").is_file()),
                   None)
    if run_cfg is not None:
        import yaml

        from ..data.token_cache import TokenCache

        source = (yaml.safe_load(run_cfg.read_text()).get("data") or {}).get("source")
        if source and Path(source).exists():
            cache = TokenCache(source)
            return cache.load_tokenizer(), cache.scale_factor
    raise ValueError(f"no tokenizer found for {args.checkpoint}: pass --tokenizer PATH (the one its token cache "
                     "was encoded with)")


def register(sub) -> None:
    p = sub.add_parser("heptapod", help="Heptapod generator: train on a token cache")
    hsub = p.add_subparsers(dest="action", required=True)
    q = hsub.add_parser("train", help="train a Heptapod generator (--data TOKEN_CACHE)")
    _add_train_args(q)
    q.set_defaults(func=lambda a: cmd_train("heptapod", a))

    p = sub.add_parser("sample", help="sample images from a Heptapod checkpoint (PNG grid + ADM .npz)")
    p.add_argument("checkpoint", help="a Heptapod checkpoint directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", help="tokenizer to decode with (default: the one of the run's token cache)")
    p.add_argument("--scale-factor", type=float, default=None, help="latent scale the cache applied (continuous)")
    p.add_argument("--num-per-class", type=int, default=8, help="samples per class (50 gives ImageNet's 50k)")
    p.add_argument("--classes", help="comma list of class indices (default: all)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--diffusion-steps", type=int, default=100)
    p.add_argument("--diffusion-temperature", type=float, default=0.95)
    p.add_argument("--diffusion-variance", choices=["large", "small"], default="large",
                   help="reverse-step variance of the diffusion sampler: beta (large) or the posterior's (small)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none, the default; "
                   "for comparisons only)")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix each step (for checking)")
    p.add_argument("--ema", action="store_true", help="sample from the checkpoint's EMA weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 autocasts the generator (about 2x faster on CPUs with AVX512-BF16 and on GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_sample)
