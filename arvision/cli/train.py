"""`arvision pretrain`, `arvision finetune` and `arvision judge train`: a task config (default YAML, recipe,
key=value overrides) run by the Trainer."""
from __future__ import annotations

import argparse


DATA_HELP = "training data: image folder, HF save_to_disk folder, WebDataset shards (folder or 'DIR/train-{000000..000009}.tar'), or 'synthetic'"


def _add_train_args(p: argparse.ArgumentParser, data_help: str = DATA_HELP) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=10")
    p.add_argument("--config", help="a recipe YAML (path or packaged name, see `arvision recipes`)")
    p.add_argument("--data", help=data_help)
    p.add_argument("--out", help="run directory (default runs/<task>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _train_config(task: str, args):
    """The task's config; with --resume, the run's saved config.yaml is the base that --config and overrides change
    (``--resume`` alone continues the run as it was configured)."""
    from ..config import load_config
    from ..tasks.common import read_saved_config

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    base = read_saved_config(args.out) if args.resume and args.out else None
    recipe = args.config
    if recipe is None and base is None and not any(o.startswith("data.source=") for o in overrides):
        from importlib import import_module

        recipe = getattr(import_module(f"arvision.tasks.{task}"), "RECIPE_WITHOUT_DATA", None)
    return load_config(task, recipe, overrides, base=base)


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


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="NEPA pretraining (synthetic data by default)")
    _add_train_args(p)
    p.set_defaults(func=lambda a: cmd_train("pretrain", a))

    p = sub.add_parser("finetune", help="supervised fine-tuning (synthetic data by default)")
    _add_train_args(p)
    p.set_defaults(func=lambda a: cmd_train("finetune", a))

    p = sub.add_parser("judge", help="a classifier of real images that scores generated samples (sample accuracy, "
                       "FD-<name>) or gives a tokenizer its perceptual loss")
    jsub = p.add_subparsers(dest="action", required=True)
    q = jsub.add_parser("train", help="train a timm classifier from scratch (the built-in digits by default)")
    _add_train_args(q)
    q.set_defaults(func=lambda a: cmd_train("judge", a))
