"""Classifier evaluation: top-1 / top-5 accuracy and NLL on hard labels (nepa_spec.md §5.5), on one or many processes.

Under torch.distributed every rank evaluates its own shard (``EvalShard``: samples rank, rank + world, ...). Shards
are padded to equal length so every rank runs the same number of forward passes (FSDP needs that); padded samples
carry label -1 and are not counted, so each sample is counted exactly once. The counts are then all-reduced.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

IGNORE = -1  # label of a padding sample


class EvalShard(Dataset):
    """Samples rank, rank + world, ... of ``dataset``, padded to ceil(n / world) with label -1 (not counted)."""

    def __init__(self, dataset: Dataset, rank: int = 0, world_size: int = 1):
        self.dataset, self.rank, self.world = dataset, rank, world_size
        self.length = math.ceil(len(dataset) / world_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int):
        i = self.rank + j * self.world
        if i < len(self.dataset):
            return self.dataset[i]
        image, _ = self.dataset[i % len(self.dataset)]
        return image, IGNORE


@torch.inference_mode()
def evaluate_classifier(model: nn.Module, loader: Iterable, device: Union[str, torch.device, None] = None,
                        amp_dtype: Optional[torch.dtype] = None, causal: Optional[bool] = None) -> dict:
    """{'top1', 'top5' (percent), 'loss' (mean NLL), 'n'} over the samples of ``loader`` (labels -1 skipped),
    summed over all processes when torch.distributed is initialised. Runs in eval mode and restores the mode."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    was_training = model.training
    model.eval()
    # correct@1, correct@5, summed NLL, count; float64 so large sums stay exact
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    try:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), torch.as_tensor(labels).to(device)
            keep = labels != IGNORE
            with amp:
                logits = model(images, causal=causal)
            logits, labels = logits[keep].float(), labels[keep]
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = top.eq(labels[:, None])
            nll = F.cross_entropy(logits, labels, reduction="sum")
            totals += torch.stack([hits[:, 0].sum(), hits.any(-1).sum(), nll,
                                   torch.tensor(labels.numel(), device=device)]).double()
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    c1, c5, nll, n = totals.tolist()
    if n == 0:
        raise ValueError("the evaluation data is empty; check the data source and split")
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": nll / n, "n": int(n)}
