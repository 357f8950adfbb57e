"""`arvision heptapod train` and `arvision sample`: train a generator on a token cache; sample PNG grids and an
ADM-format .npz (read directly by `arvision eval fid`). `torchrun --nproc_per_node K -m arvision sample ...` shares
the shards out over K processes (arvision/generate/shards.py); rerunning the same command resumes."""
from __future__ import annotations

import os
from pathlib import Path

from .train import _add_train_args, cmd_train


def cmd_sample(args) -> None:
    import torch

    from ..checkpoints import load_model
    from ..generate.outputs import class_labels
    from ..generate.sample import SamplingConfig, keep_freed_host_memory
    from ..generate.shards import sample_to_directory, sampling_settings
    from ..models.registry import generator_families

    for flag, value in (("--num-per-class", args.num_per_class), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    keep_freed_host_memory()  # a tenth of the CPU sampler's time went to page faults of re-allocated activations
    model = load_model(args.checkpoint, family=generator_families(), ema=args.ema)
    if args.cfg != 1.0 and not model.config.null_class:
        raise ValueError(f"--cfg {args.cfg} needs a generator trained with a null class (`arvision heptapod train "
                         f"model.args.null_class=true`); {args.checkpoint} has none: drop --cfg")
    cache = run_token_cache(args.checkpoint, required=not args.tokenizer)
    class_names = (cache.info.get("classes") if cache else None) or []
    classes = parse_classes(args.classes, model.config.num_classes, class_names)
    tokenizer, scale = _tokenizer(args, cache)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:  # torchrun: one GPU each
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    labels = class_labels(classes, args.num_per_class, args.seed)
    cfg = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         diffusion_steps=args.diffusion_steps, diffusion_temperature=args.diffusion_temperature,
                         diffusion_variance=args.diffusion_variance, cfg_scale=args.cfg, use_cache=not args.no_cache,
                         precision=args.precision)
    settings = sampling_settings(model, tokenizer, classes, args.num_per_class, args.seed, cfg, args.batch_size,
                                 args.shard_size, scale)
    model, tokenizer = model.to(device).eval(), tokenizer.to(device).eval()
    meta = {k: v for k, v in vars(args).items() if k != "func"}
    res = sample_to_directory(model, tokenizer, labels, cfg, args.out, settings, resume=args.resume, meta=meta,
                              class_names=class_names)
    if res.get("already"):
        print(f"{args.out} already holds these {res['num_samples']} samples: {res['npz']}")
    elif res["complete"]:
        print(f"wrote {res['num_samples']} samples: {res['grid']}, {res['npz']}")
    else:
        print(f"rank {res['rank']}: drew {res['shards_drawn']} shard(s); rank 0 assembles {args.out}")


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


def run_token_cache(checkpoint, required: bool):
    """The token cache the generator's run trained on (named in RUN/config.yaml; a generation quick start run names
    none and keeps it in RUN/cache), or None where there is none (a named cache that is missing is an error when
    ``required``: the tokenizer comes from it)."""
    from ..data.token_cache import TokenCache
    from ..files import read_yaml

    run_cfg = next((p / "config.yaml" for p in Path(checkpoint).resolve().parents if (p / "config.yaml").is_file()),
                   None)
    if run_cfg is None:
        return None
    source = ((read_yaml(run_cfg) or {}).get("data") or {}).get("source")
    if not source:
        quickstart_cache = run_cfg.parent / "cache"
        return TokenCache(quickstart_cache) if (quickstart_cache / "header.json").is_file() else None
    if not Path(source).exists():
        if not required:
            return None
        hint = " (a path relative to the directory that run was started from)" if not Path(source).is_absolute() else ""
        raise FileNotFoundError(f"the token cache {source} of the run {run_cfg.parent}{hint} is not found; pass "
                                "--tokenizer PATH (the tokenizer it was encoded with)")
    return TokenCache(source)


def _tokenizer(args, cache):
    """The tokenizer given by --tokenizer, else the one of the generator's token cache."""
    from ..checkpoints import load_tokenizer

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
    _add_train_args(q, data_help="a token cache (`arvision tokenizer encode ... --out CACHE`), not an image folder; "
                    "without --data (and --config) the generation quick start runs: tokenizer, token cache and "
                    "generator on the built-in digits")
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
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard file: the unit of work of each "
                   "process under torchrun and of resuming; memory holds one shard")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out (rerunning the same "
                   "command does the same; this flag also refuses to start a new one)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 autocasts the generator (about 2x faster on CPUs with AVX512-BF16 and on GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_sample)
