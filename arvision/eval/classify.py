"""Classifier evaluation: top-1 / top-5 accuracy and NLL on hard labels (nepa_spec.md §5.5), on one or many processes.

Under torch.distributed every rank evaluates its own shard (``arvision.eval.sharding.EvalShard``); the counts are
then all-reduced.

    loader = DataLoader(EvalShard(val_set, rank, world_size), batch_size=256)
    res = evaluate_classifier(model, loader)      # {"top1", "top5", "loss", "n"}
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from ..train.logging import progress_bar
from .sharding import unpack_weighted


@torch.inference_mode()
def evaluate_classifier(model: nn.Module, loader: Iterable, device: Union[str, torch.device, None] = None,
                        amp_dtype: Optional[torch.dtype] = None, causal: Optional[bool] = None,
                        progress: bool = False) -> dict:
    """{'top1', 'top5' (percent), 'loss' (mean NLL), 'n'} over the samples of ``loader`` (``(images, labels)`` or
    ``EvalShard``'s weighted triples; weight-0 padding is skipped), summed over all processes when torch.distributed
    is initialised. Runs in eval mode and restores the mode. Under FSDP every rank must call it (the forward passes
    gather the sharded parameters). ``progress``: a bar with an ETA on the main process (off by default: the
    Trainer's evaluations run under its own bar)."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    was_training = model.training
    model.eval()
    # correct@1, correct@5, summed NLL, count; float64 so large sums stay exact
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    try:
        for batch in progress_bar(loader, desc="classify", enabled=progress, unit="batch"):
            images, labels, keep = unpack_weighted(batch)
            images, labels = images.to(device, non_blocking=True), torch.as_tensor(labels).to(device)
            with amp:
                logits = model(images, causal=causal)
            if keep is not None:
                keep = keep.to(device)
                logits, labels = logits[keep], labels[keep]
            logits = logits.float()
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
