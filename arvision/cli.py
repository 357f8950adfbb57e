"""The ``arvision`` command line. Each subcommand has ``--help``.

    arvision pretrain [--config RECIPE] [--data DIR] [--out DIR] [--resume] [key=value ...]
    arvision finetune [--config RECIPE] [--data DIR] [--out DIR] [--resume] [key=value ...]
    arvision eval knn|linear CHECKPOINT --data DIR [--blocks middle] [--pool mean]
    arvision eval classify CHECKPOINT --data DIR [--split val] [--resize 256 | --crop-pct 0.95] [--ema]
    arvision convert SRC DST            # official NEPA checkpoint (or Hub id) -> arvision checkpoint
    arvision visualize CHECKPOINT --images a.jpg b.jpg --out DIR [--layers all] [--query 7,7]
    arvision models | arvision recipes
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=10")
    p.add_argument("--config", help="a recipe YAML (path or packaged name, see `arvision recipes`)")
    p.add_argument("--data", help="training data: image folder, HF save_to_disk folder, or 'synthetic'")
    p.add_argument("--out", help="run directory (default runs/<task>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _train_config(task: str, args):
    from .config import load_config

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    return load_config(task, args.config, overrides)


def cmd_train(task: str, args) -> None:
    import yaml

    cfg = _train_config(task, args)
    if args.print_config:
        print(yaml.safe_dump(dict(cfg), sort_keys=False))
        return
    if args.resume and not args.out:
        raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
    from importlib import import_module

    import_module(f"arvision.tasks.{task}").run(cfg, out=args.out, resume=args.resume)


def _eval_data(args, img_size: int):
    import torch
    from .data import build_dataset, eval_transform, resolve_split

    tf = eval_transform(img_size, crop_pct=args.crop_pct) if args.crop_pct else eval_transform(img_size)
    test_split = resolve_split(args.data, args.split)
    train = build_dataset(args.data, "train", tf, img_size=img_size)
    test = build_dataset(args.data, test_split, tf, img_size=img_size)
    if args.train_samples and args.train_samples < len(train):  # a fixed random subset, the same for every model
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.train_samples]
        train = torch.utils.data.Subset(train, keep.tolist())
    mk = lambda ds: torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers)
    return mk(train), mk(test), test_split, train, test


def cmd_eval_probe(args) -> None:
    import torch
    from .eval import FeatureSpec, knn_eval, linear_eval
    from .hub import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.checkpoint).to(device)
    spec = FeatureSpec.parse(blocks=args.blocks, pool=args.pool, depth=len(model.blocks))
    train_loader, test_loader, split, train, test = _eval_data(args, model.config.img_size)
    amp = torch.bfloat16 if args.precision == "bf16" else None
    if args.kind == "knn":
        res = knn_eval(model, train_loader, test_loader, spec, k=args.k, temperature=args.temperature,
                       device=device, amp_dtype=amp)
    else:
        res = linear_eval(model, train_loader, test_loader, spec, epochs=args.epochs, device=device, amp_dtype=amp)
    res = {k: v for k, v in res.items() if isinstance(v, (int, float, str, list, dict))}
    res.update(checkpoint=str(args.checkpoint), data=str(args.data), split=split, blocks=args.blocks, pool=args.pool)
    print(json.dumps(res, indent=2, default=str))
    out = Path(args.out or Path(args.checkpoint) / f"eval_{args.kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"{args.kind}: top-1 {res['top1']:.2f}% on {split} ({len(test)} images) -> {out}")


def cmd_eval_classify(args) -> None:
    import torch
    from .data import build_dataset, eval_transform, resolve_split
    from .eval.classify import evaluate_classifier
    from .hub import load_model

    if args.resize is not None and args.crop_pct is not None:
        raise ValueError("give --resize or --crop-pct, not both")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.checkpoint, ema=args.ema).to(device)
    num_classes = model.config.num_classes
    if not num_classes:
        raise ValueError(f"{args.checkpoint} has no classifier head; fine-tune it first (arvision finetune "
                         f"model.init={args.checkpoint}) or use `arvision eval knn|linear`")
    img_size = model.config.img_size
    split = resolve_split(args.data, args.split)
    dataset = build_dataset(args.data, split, eval_transform(img_size, args.resize, args.crop_pct), img_size=img_size)
    classes = getattr(dataset, "classes", None)
    if classes and len(classes) != num_classes:
        raise ValueError(f"{args.data} [{split}] has {len(classes)} classes but the classifier has {num_classes}; "
                         "evaluate on data with the classes it was trained on (same class folders)")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    causal = None if args.attention == "default" else args.attention == "causal"
    res = evaluate_classifier(model, loader, device, torch.bfloat16 if args.precision == "bf16" else None, causal)
    res.update(checkpoint=str(args.checkpoint), ema=args.ema, data=str(args.data), split=split,
               resize=args.resize, crop_pct=args.crop_pct,
               causal=model.config.causal if causal is None else causal, precision=args.precision)
    print(json.dumps(res, indent=2))
    local = Path(args.checkpoint)
    out = Path(args.out) if args.out else (local if local.is_dir() else Path(".")) / "eval_classify.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"classify: top-1 {res['top1']:.2f}%, top-5 {res['top5']:.2f}% on {split} ({res['n']} images) -> {out}")


def cmd_convert(args) -> None:
    from .hub import convert

    path = convert(args.src, args.dst, ema=args.ema)
    print(f"wrote arvision checkpoint {path}")


def cmd_models(args) -> None:
    from .models import create_model, list_models, model_config

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


def cmd_visualize(args) -> None:
    from .eval.visualize import load_images, visualize
    from .hub import load_model

    model = load_model(args.checkpoint)
    images = load_images(args.images, model.config.img_size)
    queries = [tuple(int(v) for v in q.split(",")) for q in args.query] if args.query else args.query_mode
    causal = None if args.attention == "default" else args.attention == "causal"
    files = visualize(model, images, queries, args.out, layers=args.layers, head_reduce=args.heads,
                      names=_image_names(args.images), causal=causal)
    for f in files:
        print(f)


def _image_names(paths: list[str]) -> list[str]:
    """File stems, or parent_stem (then the index) where stems collide, as in class folders."""
    names = [Path(p).stem for p in paths]
    if len(set(names)) < len(names):
        names = [f"{Path(p).parent.name}_{Path(p).stem}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arvision", description="Autoregressive vision: NEPA pretraining, "
                                     "probing, fine-tuning and official checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="NEPA pretraining (synthetic data by default)")
    _add_train_args(p)
    p.set_defaults(func=lambda a: cmd_train("pretrain", a))

    p = sub.add_parser("finetune", help="supervised fine-tuning (synthetic data by default)")
    _add_train_args(p)
    p.set_defaults(func=lambda a: cmd_train("finetune", a))

    p = sub.add_parser("eval", help="evaluate a checkpoint: knn | linear | classify")
    esub = p.add_subparsers(dest="kind", required=True)
    for kind, text in (("knn", "weighted kNN (k=20, T=0.07, cosine) on frozen features"),
                       ("linear", "linear probe on frozen features")):
        q = esub.add_parser(kind, help=text)
        q.add_argument("checkpoint", help="arvision or official checkpoint directory, or a Hub id")
        q.add_argument("--data", required=True, help="labelled data: image folder with train/ and val/ or test/")
        q.add_argument("--split", default="val", help="evaluation split (val falls back to test)")
        q.add_argument("--blocks", default="last", help="blocks to read: index, comma list (averaged), middle, last, all")
        q.add_argument("--pool", default="mean", choices=["mean", "cls", "last"], help="token pooling")
        q.add_argument("--batch-size", type=int, default=256)
        q.add_argument("--num-workers", type=int, default=2)
        q.add_argument("--crop-pct", type=float, default=None, help="eval resize = img_size / crop_pct")
        q.add_argument("--train-samples", type=int, default=None, help="use a fixed random subset of the train split")
        q.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
        q.add_argument("--out", help="result JSON (default CHECKPOINT/eval_<kind>.json)")
        if kind == "knn":
            q.add_argument("--k", type=int, default=20)
            q.add_argument("--temperature", type=float, default=0.07)
        else:
            q.add_argument("--epochs", type=int, default=50)
        q.set_defaults(func=cmd_eval_probe)

    q = esub.add_parser("classify", help="top-1 / top-5 of a classifier checkpoint (fine-tuned or official -sft)")
    q.add_argument("checkpoint", help="arvision or official classifier checkpoint directory, or a Hub id")
    q.add_argument("--data", required=True, help="image folder with val/ or test/ class folders, or HF save_to_disk")
    q.add_argument("--split", default="val", help="evaluation split (val falls back to test)")
    q.add_argument("--resize", type=int, default=None, help="shorter side before the centre crop (default "
                   "img_size / 0.875, i.e. 256 for 224; none for img_size <= 64)")
    q.add_argument("--crop-pct", type=float, default=None, help="square warp to img_size / crop_pct, then centre "
                   "crop (the official L eval: 0.95)")
    q.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    q.add_argument("--attention", default="default", choices=["default", "causal", "bidirectional"],
                   help="default: the checkpoint's attention mode")
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--num-workers", type=int, default=2)
    q.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    q.add_argument("--out", help="result JSON (default CHECKPOINT/eval_classify.json for a local checkpoint)")
    q.set_defaults(func=cmd_eval_classify)

    p = sub.add_parser("convert", help="write any supported checkpoint as an arvision checkpoint")
    p.add_argument("src", help="official NEPA directory, arvision checkpoint, or Hub id")
    p.add_argument("dst", help="output directory")
    p.add_argument("--ema", action="store_true", help="take the official pretraining EMA weights")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("visualize", help="attention and next-embedding similarity maps as PNG grids")
    p.add_argument("checkpoint")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", default="all", help="all | last | N (last N) | comma list, e.g. 0,5,-1")
    p.add_argument("--heads", default="mean", choices=["mean", "max"])
    p.add_argument("--query", nargs="*", help="query patches as row,col (default: --query-mode)")
    p.add_argument("--query-mode", default="center", choices=["center", "random"])
    p.add_argument("--attention", default="default", choices=["default", "causal", "bidirectional"])
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("models", help="list registered model presets")
    p.add_argument("--count", action="store_true", help="also count parameters")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("recipes", help="list packaged recipe configs")
    p.set_defaults(func=cmd_recipes)
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (argparse stops collecting positionals at an option)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except (ValueError, OSError, ImportError, KeyError) as e:
        if "--traceback" in sys.argv or __import__("os").environ.get("ARVISION_TRACEBACK"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"arvision: error: {msg}", file=sys.stderr)
        sys.exit(2)
