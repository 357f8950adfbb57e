"""Deterministic, resumable data order shared by 1..N processes.

Each epoch draws one global permutation from (seed, epoch). Optimizer step s consumes the global batch
perm[s*G : (s+1)*G] (G = global batch); micro-batch a of rank r is the slice starting at
s*G + (a*world + r)*m. One process with accumulation therefore sees exactly the samples that N processes
see together, and a resumed run starts at the step where it stopped.

Augmentation randomness is tied to the sample, not to the worker: the sampler yields (index, seed) pairs
and ``SeededDataset`` seeds torch / random / numpy with that seed before the transform runs, so a resumed
run gets the same crops and flips as an uninterrupted one.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


class ResumableSampler(Sampler):
    def __init__(self, dataset_len: int, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x "
                             f"{world_size} processes; change train.batch_size or train.micro_batch_size")
        if dataset_len < global_batch:
            raise ValueError(f"the dataset has {dataset_len} samples, fewer than one global batch of {global_batch}; "
                             f"lower train.batch_size")
        self.n, self.G, self.m = dataset_len, global_batch, micro_batch
        self.rank, self.world, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.accum = global_batch // (micro_batch * world_size)
        self.steps_per_epoch = dataset_len // global_batch  # drop_last, as the official recipe
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum * self.m

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        sample_seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g)
        for s in range(self.start_step, self.steps_per_epoch):
            for a in range(self.accum):
                start = s * self.G + (a * self.world + self.rank) * self.m
                for i in perm[start:start + self.m].tolist():
                    yield i, int(sample_seeds[i])


class SeededDataset(Dataset):
    """Wraps a dataset so that item (index, seed) runs its transform under that seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        if get_worker_info() is not None:
            return self._seeded(index, seed)
        # In the main process (num_workers=0) the global RNG streams belong to the model: restore them after.
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            try:
                return self._seeded(index, seed)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def _seeded(self, index: int, seed: int):
        # Only the CPU generator: the transforms run on the CPU. torch.manual_seed would also reseed every accelerator
        # generator, the training's, or before CUDA starts queue that with a formatted stack trace (a quarter of a small
        # generator's step on a CPU: benchmarks/bench_sample_seeding.py).
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]
