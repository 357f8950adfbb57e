"""The ``arvision`` command line. Each subcommand has ``--help``.

    arvision pretrain [--config RECIPE] [--data DIR] [--out DIR] [--resume] [key=value ...]
    arvision finetune [--config RECIPE] [--data DIR] [--out DIR] [--resume] [key=value ...]
    arvision eval knn|linear CHECKPOINT --data DIR [--blocks middle] [--pool mean]
    arvision eval classify CHECKPOINT --data DIR [--split val] [--resize 256 | --crop-pct 0.95] [--ema]
    arvision eval fid SAMPLES REF [--extractor fid-helper|inception|CHECKPOINT] [--num-samples N] [--num-ref N]
    arvision eval nll GENERATOR_CHECKPOINT --data HELD_OUT_TOKEN_CACHE [--ema] [--num N]
    arvision convert SRC DST            # official NEPA checkpoint (or Hub id) -> arvision checkpoint
    arvision convert CKPT DST --to official [--class-names a,b]   # NEPA ViT -> Hugging Face ViTNepa layout
    arvision hub push CHECKPOINT OWNER/NAME [--local DIR]           # weights, config, model card to the Hub
    arvision visualize CHECKPOINT --images a.jpg b.jpg --out DIR [--layers all] [--query 7,7]
    arvision tokenizer train | eval TOK --data DIR | encode --tokenizer TOK --data DIR --out CACHE | reconstruct TOK
    arvision segment train | eval CHECKPOINT --data DIR | predict CHECKPOINT --images a.jpg --out DIR
    arvision heptapod train --data TOKEN_CACHE [key=value ...]
    arvision judge train [--config cifar10_judge] [--data DIR] [--out DIR]   # a classifier that scores samples
    arvision sample CHECKPOINT --out DIR [--num-per-class 50] [--temperature 1.0] [--top-k 0] [--cfg 1.0]
    arvision data shard DIR OUT [--split train] [--shard-size N | --max-size MB]   # WebDataset tar shards
    arvision demo CHECKPOINT [--port 7860] [--share false]      # Gradio page: sample a grid / NEPA maps
    arvision models | arvision recipes
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from . import catalog, data, demo, evaluate, generate, segment, tokenizer, train, visualize

COMMANDS = (train, tokenizer, generate, segment, evaluate, data, catalog, visualize, demo)  # each module adds its subcommands with register(subparsers)


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
    # what the run directory records (run.json) and the model card shows as the command that made a run
    os.environ["ARVISION_COMMAND"] = shlex.join(["arvision", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except KeyboardInterrupt as e:  # Ctrl-C: a training run has saved its last step (like SIGTERM); no traceback
        if _traceback_wanted():
            raise
        print(f"arvision: {error_line(e) if e.args else 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except KNOWN_ERRORS as e:
        if _traceback_wanted():
            raise
        print(f"arvision: error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)


# Bad input, missing or unreadable files, missing optional packages: one line, no traceback (--traceback or
# ARVISION_TRACEBACK=1 shows it). Readers raise these with the file's name and what to do (arvision.files).
KNOWN_ERRORS = (ValueError, OSError, ImportError, KeyError)


def _traceback_wanted() -> bool:
    return "--traceback" in sys.argv or bool(os.environ.get("ARVISION_TRACEBACK"))


def error_line(error: BaseException) -> str:
    """The message of ``error`` on one line. An exception re-raised by a DataLoader worker carries the worker's whole
    traceback in its message ('Caught DataError in DataLoader worker process 0. Original Traceback ...'): its last
    exception line is the original message. An error that names a Python call or keyword carries the command-line
    form of its advice (``arvision.files.command_line_error``): that is printed."""
    msg = getattr(error, "command_line_message", None) or (
        error.args[0] if isinstance(error, KeyError) and error.args else str(error))
    msg = str(msg)
    if "Original Traceback (most recent call last)" in msg:
        tail = msg.rsplit(f"{type(error).__name__}: ", 1)
        if len(tail) == 2:
            msg = tail[1]
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
