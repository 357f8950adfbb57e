"""`arvision visualize`: attention and next-embedding similarity maps as PNG grids."""
from __future__ import annotations

from pathlib import Path


def cmd_visualize(args) -> None:
    from ..eval.visualize import load_images, visualize
    from ..checkpoints import load_model

    model = load_model(args.checkpoint, family="nepa_vit")
    images = load_images(args.images, model.config.img_size)
    queries = [tuple(int(v) for v in q.split(",")) for q in args.query] if args.query else args.query_mode
    causal = None if args.attention == "default" else args.attention == "causal"
    files = visualize(model, images, queries, args.out, layers=args.layers, head_reduce=args.heads,
                      names=_image_names(args.images), causal=causal)
    for f in files:
        print(f)


def _image_names(paths: list[str]) -> list[str]:
    """File stems, with parent folders where stems collide, as in class folders (arvision.files.output_names)."""
    from ..files import output_names
    return output_names(paths)


def register(sub) -> None:
    p = sub.add_parser("visualize", help="attention and next-embedding similarity maps as PNG grids")
    p.add_argument("checkpoint")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", default="all", help="blocks: all | last | middle | an index | a comma list (0,5,-1) | a slice (-4: = the last four)")
    p.add_argument("--heads", default="mean", choices=["mean", "max"])
    p.add_argument("--query", nargs="*", help="query patches as row,col (default: --query-mode)")
    p.add_argument("--query-mode", default="center", choices=["center", "random"])
    p.add_argument("--attention", default="default", choices=["default", "causal", "bidirectional"])
    p.set_defaults(func=cmd_visualize)
