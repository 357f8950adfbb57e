"""The cost of seeding each sample in the Trainer's loader: the CPU generator alone (now) against ``torch.manual_seed``
(before), side by side in one run.

The Trainer's ``SeededDataset`` seeds the random streams before each sample's transform, so that a resumed run gets
the same augmentations. ``torch.manual_seed`` also seeds every accelerator generator; before CUDA has started (always
on a CPU machine, and in the main process until the first CUDA call) each call queues that seeding together with
``traceback.format_stack()`` of the caller, whose cost grows with the stack's depth. In the main process
(``num_workers=0``, the quick start's and every CPU run's setting) that ran 64 times per step. This benchmark times
``--batches`` batches of a ``DataLoader`` over ``SeededDataset`` (the Trainer's sampler and collation) with each way
of seeding, called from ``--depth`` extra Python frames (a training step sits ~30 frames deep: command line, task,
Trainer, loader), alternating the two sides over ``--repeats`` rounds, median per side.

    python benchmarks/bench_sample_seeding.py                    # synthetic digits at 32 px, batch 64
    python benchmarks/bench_sample_seeding.py --data RUN/cache                # a token cache (the generator's loader)
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arvision.data import build_dataset  # noqa: E402
from arvision.data.token_cache import TokenCache  # noqa: E402
from arvision.data.transforms import eval_transform  # noqa: E402
from arvision.train.sampler import ResumableSampler, SeededDataset  # noqa: E402


def seeded_with_manual_seed(self, index: int, seed: int):
    """``SeededDataset._seeded`` before: ``torch.manual_seed`` instead of the CPU generator's."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    return self.dataset[index]


def at_depth(depth: int, fn):
    """Call ``fn`` from ``depth`` nested Python frames."""
    return fn() if depth == 0 else at_depth(depth - 1, fn)


def loader_seconds(dataset, batch: int, batches: int, depth: int) -> float:
    sampler = ResumableSampler(len(dataset), batch, batch, seed=0)
    loader = DataLoader(SeededDataset(dataset), batch_size=batch, sampler=sampler, num_workers=0, drop_last=True)

    def run():
        it = iter(loader)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        return time.perf_counter() - t0

    return at_depth(depth, run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="synthetic-digits", help="a built-in set, an image folder or a token cache")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--depth", type=int, default=30, help="extra Python frames above the loader")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if (Path(args.data) / "header.json").is_file():  # a token cache (the generator's data)
        dataset = TokenCache(args.data)
    else:
        dataset = build_dataset(args.data, "train", eval_transform(args.img_size), img_size=args.img_size)
    times = {"torch.manual_seed (before)": [], "CPU generator (now)": []}
    for r in range(args.repeats):
        order = list(times) if r % 2 == 0 else list(reversed(times))
        for side in order:
            before = side.startswith("torch")
            with mock.patch.object(SeededDataset, "_seeded", seeded_with_manual_seed) if before else nullcontext():
                times[side].append(loader_seconds(dataset, args.batch_size, args.batches, args.depth))
    base = statistics.median(times["torch.manual_seed (before)"])
    print(f"{args.data}, batch {args.batch_size}, {args.batches} batches, depth {args.depth}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| seeding | ms per batch (median) | ms per sample | x before |")
    print("|---|---|---|---|")
    for side, ts in times.items():
        sec = statistics.median(ts) / args.batches
        print(f"| {side} | {1e3 * sec:.1f} | {1e3 * sec / args.batch_size:.3f} | "
              f"{base / statistics.median(ts):.2f} |")


if __name__ == "__main__":
    main()
