"""The ``arvision`` command line. Each subcommand has ``--help``.

    arvision pretrain [--config RECIPE] [--data DIR] [--out DIR] [--resume] [key=value ...]
    arvision finetune [--config RECIPE] [--data DIR] [--out DIR] [--resume] [key=value ...]
    arvision eval knn|linear CHECKPOINT --data DIR [--blocks middle] [--pool mean]
    arvision eval classify CHECKPOINT --data DIR [--split val] [--resize 256 | --crop-pct 0.95] [--ema]
    arvision eval fid SAMPLES REF [--extractor fid-helper|inception|CHECKPOINT] [--num-samples N] [--num-ref N]
    arvision convert SRC DST            # official NEPA checkpoint (or Hub id) -> arvision checkpoint
    arvision visualize CHECKPOINT --images a.jpg b.jpg --out DIR [--layers all] [--query 7,7]
    arvision tokenizer train | eval TOK --data DIR | encode --tokenizer TOK --data DIR --out CACHE | reconstruct TOK
    arvision segment train | eval CHECKPOINT --data DIR | predict CHECKPOINT --images a.jpg --out DIR
    arvision heptapod train --data TOKEN_CACHE [key=value ...]
    arvision sample CHECKPOINT --out DIR [--num-per-class 50] [--temperature 1.0] [--top-k 0] [--cfg 1.0]
    arvision models | arvision recipes
"""
from __future__ import annotations

import argparse
import os
import sys

from . import catalog, evaluate, generate, segment, tokenizer, train, visualize

COMMANDS = (train, tokenizer, generate, segment, evaluate, catalog, visualize)  # each module adds its subcommands with register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arvision", description="Autoregressive vision: NEPA pretraining, "
                                     "probing, fine-tuning and official checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
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
        if "--traceback" in sys.argv or os.environ.get("ARVISION_TRACEBACK"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"arvision: error: {msg}", file=sys.stderr)
        sys.exit(2)
