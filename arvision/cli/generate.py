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

    for flag, value in (("--num-per-class", args.num_per_class), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    model = load_model(args.checkpoint, family="heptapod", ema=args.ema)
    cache = _run_token_cache(args.checkpoint, required=not args.tokenizer)
    classes = parse_classes(args.classes, model.config.num_classes, (cache.info.get("classes") if cache else None)
                            or [])
    tokenizer, scale = _tokenizer(args, cache)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = model.to(device).eval(), tokenizer.to(device).eval()
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


def parse_classes(text, num_classes: int, names: list) -> list[int]:
    """``--classes``: a comma list of class indices or names (the names of the run's token cache); all by default."""
    if not text:
        return list(range(num_classes))
    lookup = {str(n): i for i, n in enumerate(names)}
    folded = {str(n).casefold(): i for i, n in enumerate(names)}
    classes, unknown = [], []
    for item in (c.strip() for c in text.split(",") if c.strip()):
        if item.lstrip("-").isdigit():
            index = int(item)
        else:
            index = lookup.get(item, folded.get(item.casefold()))
        if index is None or not 0 <= index < num_classes:
            unknown.append(item)
        else:
            classes.append(index)
    if unknown or not classes:
        shown = ", ".join(map(str, names[:30])) + (f" and {len(names) - 30} more" if len(names) > 30 else "")
        valid = f"indices 0..{num_classes - 1}" + (f" or the names {shown}" if names else
                                                   " (class names are not known here: the run's token cache was not "
                                                   "found)")
        numeric = unknown and all(u.lstrip("-").isdigit() for u in unknown)
        problem = "class indices out of range" if numeric else "not a class of this generator"
        raise ValueError(f"--classes {', '.join(map(repr, unknown or [text]))}: {problem}; valid: {valid}")
    return classes


def _run_token_cache(checkpoint, required: bool):
    """The token cache the generator's run trained on (named in RUN/config.yaml), or None where there is none (a
    named cache that is missing is an error when ``required``: the tokenizer comes from it)."""
    from ..data.token_cache import TokenCache
    from ..files import read_yaml

    run_cfg = next((p / "config.yaml" for p in Path(checkpoint).resolve().parents if (p / "config.yaml").is_file()),
                   None)
    if run_cfg is None:
        return None
    source = ((read_yaml(run_cfg) or {}).get("data") or {}).get("source")
    if not source:
        return None
    if not Path(source).exists():
        if not required:
            return None
        hint = " (a path relative to the directory that run was started from)" if not Path(source).is_absolute() else ""
        raise FileNotFoundError(f"the token cache {source} of the run {run_cfg.parent}{hint} is not found; pass "
                                "--tokenizer PATH (the tokenizer it was encoded with)")
    return TokenCache(source)


def _tokenizer(args, cache):
    """The tokenizer given by --tokenizer, else the one of the generator's token cache."""
    from ..models.tokenizers import load_tokenizer

    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
        return tok, args.scale_factor if args.scale_factor is not None else tok.scale_factor
    if cache is not None:
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
    p.add_argument("--classes", help="comma list of class indices or names (the run's token cache knows the "
                   "names, e.g. cat,ship); default: all")
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
