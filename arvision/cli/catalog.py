"""`arvision convert`, `arvision models`, `arvision recipes`: checkpoints and the catalogue of presets and recipes."""
from __future__ import annotations

def cmd_convert(args) -> None:
    from ..checkpoints import convert

    path = convert(args.src, args.dst, ema=args.ema)
    print(f"wrote arvision checkpoint {path}")


def cmd_models(args) -> None:
    from ..models import create_model, list_models, model_config

    for name in list_models():
        c = model_config(name)
        n = sum(p.numel() for p in create_model(name).parameters()) if args.count else None
        extra = f"  {n:>13,} params" if n else ""
        print(f"{name:32s} D{c.embed_dim:<5d} L{c.depth:<3d} H{c.num_heads:<3d} {c.img_size}px/p{c.patch_size} "
              f"{c.mlp_type:6s} qk_norm={c.qk_norm}{extra}")


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
    p.add_argument("--ema", action="store_true", help="take the official pretraining EMA weights")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("models", help="list registered model presets")
    p.add_argument("--count", action="store_true", help="also count parameters")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("recipes", help="list packaged recipe configs")
    p.set_defaults(func=cmd_recipes)
