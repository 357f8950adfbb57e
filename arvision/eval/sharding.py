"""Evaluation on one or many processes: under torch.distributed every rank evaluates its own shard (``EvalShard``:
samples rank, rank + world, ...) of any ``(inputs, targets)`` dataset (classification, segmentation). Shards are
padded to equal length so every rank runs the same number of forward passes (FSDP needs that). A shard yields
``(inputs, targets, weight)``: padding repeats a real sample (its inputs and targets, whatever they are: labels,
masks, ...) with weight 0, so evaluators drop it and each sample is counted exactly once.

    loader = DataLoader(EvalShard(val_set, rank, world_size), batch_size=256)
    for batch in loader:
        inputs, targets, keep = unpack_weighted(batch)   # keep: False for padding
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset


class EvalShard(Dataset):
    """Samples rank, rank + world, ... of ``dataset`` as ``(inputs, targets, weight)``, padded to ceil(n / world)
    by repeating real samples with weight 0 (not counted)."""

    def __init__(self, dataset: Dataset, rank: int = 0, world_size: int = 1):
        self.dataset, self.rank, self.world = dataset, rank, world_size
        self.length = math.ceil(len(dataset) / world_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int):
        i = self.rank + j * self.world
        inputs, targets = self.dataset[i % len(self.dataset)]
        return inputs, targets, 1 if i < len(self.dataset) else 0


def unpack_weighted(batch) -> tuple:
    """(inputs, targets, keep) from an ``(inputs, targets)`` or ``EvalShard``'s ``(inputs, targets, weight)`` batch;
    keep is a boolean tensor, or None when every sample counts."""
    if len(batch) == 3:
        inputs, targets, weight = batch
        return inputs, targets, torch.as_tensor(weight).bool()
    inputs, targets = batch
    return inputs, targets, None
