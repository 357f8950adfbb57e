"""Learning-rate schedules and the AdamW optimizer over parameter groups.

The groups come from the objective (``objectives.param_groups``: weight decay on matrices, layer-wise lr decay).
Every group carries ``lr_base`` (its peak lr before scaling), ``lr_scale`` (f) and ``warmup_steps`` (w).
The schedule (``lr_at``) is linear warmup from 0 over w steps, then a half-cosine from f * lr_base to
``min_lr``, as in HF's ``cosine`` schedule used by the official code (the first step runs at lr 0); ``train.schedule``
also offers ``constant`` (MAR) and ``poly`` (mmcv / mmseg's segmentation schedule, ``train.poly_power``).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

SCHEDULES = ("cosine", "constant", "poly")


def lr_at(step: int, group: dict, total_steps: int, min_lr: float = 0.0, schedule: str = "cosine",
          power: float = 1.0) -> float:
    """The lr of ``group`` at ``step``: linear warmup, then ``cosine`` (HF / official NEPA) or ``constant`` (MAR);
    ``poly`` is mmcv's: (f lr_base - f min_lr) (1 - t/T)^power + f min_lr over the whole run, times the linear warmup
    factor t/w while t < w (mmseg's ADE20K schedule)."""
    f, w, base = group["lr_scale"], group["warmup_steps"], group["lr_base"]
    if schedule == "poly":
        t = min(step, total_steps)
        lr = (base - min_lr) * f * (1.0 - t / max(1, total_steps)) ** power + min_lr * f
        return lr * step / w if step < w else lr
    if step < w:
        return base * f * step / max(1, w)
    if schedule == "constant":
        return base * f
    if step >= total_steps:
        return min_lr * f
    if schedule != "cosine":
        raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {schedule!r}")
    progress = (step - w) / max(1, total_steps - w)
    return min_lr * f + (base - min_lr) * f * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, min_lr: float = 0.0,
           schedule: str = "cosine", power: float = 1.0) -> float:
    """Sets every group's lr for ``step``; returns the largest (for logging)."""
    lrs = []
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, g, total_steps, min_lr, schedule, power)
        lrs.append(g["lr"])
    return max(lrs)


def build_adamw(groups: Iterable[dict], betas=(0.9, 0.95), eps: float = 1e-8, device_type: str = "cpu"):
    groups = [{k: v for k, v in g.items() if k != "names"} | {"lr": 0.0} for g in groups]
    # The fused kernel is the fastest on CUDA and on the CPU (benchmarks/README.md); foreach on other devices.
    kwargs = dict(fused=True) if device_type in ("cuda", "cpu") else dict(foreach=True)
    return torch.optim.AdamW(groups, betas=tuple(betas), eps=eps, **kwargs)
