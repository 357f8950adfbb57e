"""`arvision convert`, `arvision models`, `arvision recipes`: checkpoints and the catalogue of presets and recipes.

    arvision convert SRC DST [--ema]        # any supported checkpoint -> arvision checkpoint
    arvision models [--family vq_tokenizer] # presets grouped by family, with parameter counts
    arvision recipes                        # the packaged recipe configs
"""
from __future__ import annotations


def cmd_convert(args) -> None:
    from ..checkpoints import convert

    path = convert(args.src, args.dst, ema=args.ema)
    print(f"wrote arvision checkpoint {path}")


def preset_summary(name: str) -> str:
    """A short description of a preset: its config's ``summary()`` when the family defines one, else the
    fields the preset sets."""
    from ..models import registry

    config = registry.model_config(name)
    if callable(getattr(config, "summary", None)):
        return config.summary()
    return " ".join(f"{k}={v}" for k, v in registry.preset_fields(name).items())


def preset_parameters(name: str) -> int:
    """Parameter count of a preset, built on the meta device (no memory, no init) when the family allows it."""
    import torch

    from ..models import count_parameters, create_model

    try:
        with torch.device("meta"):
            return count_parameters(create_model(name))
    except Exception:  # a constructor that computes with real tensors
        return count_parameters(create_model(name))


def cmd_models(args) -> None:
    from ..models import get_family, list_families, list_models

    families = [get_family(args.family).name] if args.family else list_families()
    for i, family in enumerate(families):
        names = list_models(family)
        if not names:
            continue
        desc = get_family(family).description
        print(("\n" if i else "") + f"{family}" + (f": {desc}" if desc else ""))
        for name in names:
            print(f"  {name:32s} {preset_parameters(name):>13,} params  {preset_summary(name)}")


def cmd_recipes(args) -> None:
    from importlib import resources

    for f in sorted(resources.files("arvision.configs").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            first = next((line for line in f.read_text().splitlines() if line.startswith("#")), "")
            print(f"{f.name[:-5]:34s} {first.lstrip('# ')}")


def register(sub) -> None:
    p = sub.add_parser("convert", help="write any supported checkpoint as an arvision checkpoint")
    p.add_argument("src", help="official NEPA directory, arvision checkpoint, or Hub id")
    p.add_argument("dst", help="output directory")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (official pytorch_model_ema.bin or "
                   "arvision ema.safetensors)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("models", help="list registered model presets by family, with parameter counts")
    p.add_argument("--family", help="only this family (e.g. nepa_vit, vq_tokenizer)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("recipes", help="list packaged recipe configs")
    p.set_defaults(func=cmd_recipes)
