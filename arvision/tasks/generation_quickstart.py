"""The generation quick start: ``arvision heptapod train`` with no ``--data`` runs the whole generative chain on the
built-in digits (``synthetic-digits``) and scores what it makes, in minutes on a CPU (8.4-9.0 minutes on an idle
2-core CPU, 96.6-97.2% sample accuracy; much longer under load):

    arvision heptapod train                              # -> runs/heptapod-<time>/
    arvision heptapod train --out runs/q --resume        # finished stages are reused, the others resume

Stages, each in the run directory:

1. ``tokenizer/``  a small VQ tokenizer (``quickstart.tokenizer``) trained on the digits (the tokenizer task), with a
   perceptual loss in the features of ``perceptual_net/``, a second classifier of real digits trained as the judge
   with another seed (``quickstart.perceptual_weight``; 0 leaves the L1 loss alone);
2. ``cache/``      the training digits as code grids (no mirrored copies: a mirrored 3 is not a 3);
3. ``judge/``      a classifier of real digits (``quickstart.judge``, a timm ResNet), trained by the judge task
   (``arvision judge train``);
4. the Heptapod generator on that cache (the heptapod task; every ``train.eval_every`` epochs it samples a small
   grid and scores it with the judge: ``samples/step_*.png`` and ``eval/*`` rows in metrics.jsonl);
5. ``samples.png`` / ``samples.npz`` and the score, printed as one line and written to results.json: **sample
   accuracy** (the fraction of samples the judge assigns to the class they were generated for), beside the judge's
   own accuracy on held-out real digits, and **FD** in the judge's features against those real digits.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..config import load_config
from ..data.token_cache import TokenCache
from ..data.token_cache_writer import build_token_cache
from ..files import write_json
from ..checkpoints import load_tokenizer
from ..train.checkpoint import latest_checkpoint
from ..train.config import PRECISIONS
from ..train.logging import log, setup_logging

DIGITS = "synthetic-digits"
IMG_SIZE = 32


def run_quickstart(cfg, out=None, resume=False) -> dict:
    """The chain above; ``cfg`` is the heptapod task config with ``data.source`` null (the ``heptapod_quickstart``
    recipe when the command line gives no data: the generator's model, objective, train, online and sample keys
    come from it; the tokenizer's and the judge's from the ``quickstart`` block)."""
    from .heptapod import train_generator

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("the generation quick start runs in one process; give --data TOKEN_CACHE to train a "
                         "generator under torchrun")
    q = cfg.quickstart
    if q.tokenizer_precision not in PRECISIONS:  # checked before any stage runs (the tokenizer is the second)
        raise ValueError(f"quickstart.tokenizer_precision={q.tokenizer_precision!r} is not one of "
                         f"{', '.join(PRECISIONS)}")
    run_dir = Path(out or f"runs/heptapod-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if not resume and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"run directory {run_dir} already holds checkpoints; pass --resume to continue it or "
                              "choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(True, run_dir)
    t0 = time.perf_counter()
    log.info(f"generation quick start on the built-in digits in {run_dir}: tokenizer -> token cache -> judge -> "
             f"Heptapod -> samples and score")
    tokenizer_done = (run_dir / "tokenizer" / "results.json").is_file()  # a finished tokenizer needs no network
    perceptual_net = (train_judge(q, run_dir / "perceptual_net", cfg.train.seed + 1, cfg.online.num_ref)
                      if q.perceptual_weight > 0 and not tokenizer_done else None)
    tokenizer = train_tokenizer(q, run_dir / "tokenizer", cfg.train.seed, cfg.online.num_ref, perceptual_net)
    cache = encode_digits(tokenizer, q, run_dir / "cache")
    judge_path = train_judge(q, run_dir / "judge", cfg.train.seed, cfg.online.num_ref)
    cfg.online.update(judge=str(judge_path), reference=DIGITS)
    if cfg.sample.num_per_class < 1:
        raise ValueError("the quick start scores its final samples: set sample.num_per_class >= 1")
    results = train_generator(cfg, cache, run_dir, resume=latest_checkpoint(run_dir) is not None)
    results["total_minutes"] = (time.perf_counter() - t0) / 60
    write_json(run_dir / "results.json", results)
    log.info(f"samples: {run_dir / 'samples.png'}; {results['total_minutes']:.1f} minutes in all")
    print(score_line(results["score"]))
    return results


def score_line(score: dict) -> str:
    return (f"sample accuracy {100 * score['sample_accuracy']:.1f}% (classifier on real held-out images "
            f"{100 * score['judge_real_accuracy']:.1f}%), {score['fd_name']} {score['fd']:.2f}")


def train_tokenizer(q, out: Path, seed: int, num_eval: int, perceptual_net: Path | None = None):
    """The quick start's VQ tokenizer, trained by the tokenizer task (reused when ``out`` already finished), with the
    perceptual loss of ``perceptual_net`` (a classifier checkpoint) when given."""
    from .tokenizer import run as run_tokenizer_task

    if not (out / "results.json").is_file():
        overrides = [f"model.name={q.tokenizer}", f"model.args={{codebook_size: {q.codebook_size}}}",
                     f"data.source={DIGITS}", f"data.img_size={IMG_SIZE}",
                     "data.hflip=0.0", f"data.num_samples={q.num_images}", "data.num_workers=0",
                     f"train.max_steps={q.tokenizer_steps}", f"train.batch_size={q.tokenizer_batch}",
                     f"train.lr={q.tokenizer_lr}", f"train.precision={q.tokenizer_precision}",
                     f"train.warmup_steps={max(1, q.tokenizer_steps // 20)}",
                     f"train.ckpt_every={q.tokenizer_steps}", "train.log_every=25", f"train.seed={seed}",
                     f"eval.num_images={num_eval}", "eval.batch_size=100"]
        if perceptual_net is not None:
            overrides += [f"objective.perceptual_weight={q.perceptual_weight}", f"objective.perceptual_net={perceptual_net}"]
        run_tokenizer_task(load_config("tokenizer", overrides=overrides), out=str(out),
                           resume=latest_checkpoint(out) is not None)
    ev = json.loads((out / "results.json").read_text()).get("eval", {})
    log.info(f"tokenizer: PSNR {ev.get('psnr', float('nan')):.2f} dB, codebook usage "
             f"{100 * ev.get('codebook_usage', float('nan')):.0f}% on held-out digits ({out / 'reconstructions.png'})")
    return load_tokenizer(latest_checkpoint(out))


def encode_digits(tokenizer, q, out: Path) -> TokenCache:
    """The training digits as token grids (resumes a partial cache, returns at once for a complete one)."""
    build_token_cache(tokenizer, DIGITS, out, split="train", img_size=IMG_SIZE, batch_size=100, num_workers=0,
                      flip=False, limit=q.num_images, progress=False)
    return TokenCache(out)


def train_judge(q, out: Path, seed: int, num_eval: int) -> Path:
    """A classifier of real digits (the judge task, ``quickstart.judge``), reused when ``out`` already finished.
    Returns its checkpoint. (The judge, and with another seed the tokenizer's perceptual network.)"""
    from .judge import run as run_judge_task

    if not (out / "results.json").is_file():
        # batch 64, weight decay 0.05, no EMA, no augmentation: the judge task's defaults
        overrides = [f"model.name={q.judge}", f"data.source={DIGITS}", f"data.img_size={IMG_SIZE}",
                     f"data.num_samples={q.num_images}", "data.num_workers=0", f"train.max_steps={q.judge_steps}",
                     f"train.lr={q.judge_lr}", f"train.warmup_steps={max(1, q.judge_steps // 10)}",
                     f"train.seed={seed}", f"eval.num_images={num_eval}"]
        run_judge_task(load_config("judge", overrides=overrides), out=str(out),
                       resume=latest_checkpoint(out) is not None)
    return latest_checkpoint(out)
