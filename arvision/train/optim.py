"""AdamW parameter groups and learning-rate schedules.

Every group carries ``lr_base`` (its peak lr before scaling), ``lr_scale`` (f) and ``warmup_steps`` (w).
The schedule (``lr_at``) is linear warmup from 0 over w steps, then a half-cosine from f * lr_base to
``min_lr``, as in HF's ``cosine`` schedule used by the official code (the first step runs at lr 0); ``train.schedule``
also offers ``constant`` (MAR) and ``poly`` (mmcv / mmseg's segmentation schedule, ``train.poly_power``).

Pretraining (nepa_spec.md §4): one lr for all, weight decay on every parameter with ndim >= 2 (Linear/Conv
weights and the CLS token), none on biases, norms and LayerScale.

Fine-tuning layer-wise lr decay (nepa_spec.md §5.3), ``llrd_groups``:
  official: block i gets f = llrd^(L-1-i) (top block undecayed), CLS/patch embedding f = llrd^L, the
            classifier and the final norm use ``head_lr`` with f = 1, fc_norm uses lr with f = 1, and the
            warmup is inverted per group: w_g = max(1, W - round(W * min(f, 1))).
  standard: MAE/BEiT: layer id 0 for the embeddings, i + 1 for block i, L + 1 for the rest;
            f = llrd^(L + 1 - id), one global warmup W, head at the base lr.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional

import torch
from torch import nn

_NO_DECAY = re.compile(r"(bias|norm|layer_scale|ls\d\.gamma)")


def decays(name: str, param: torch.Tensor) -> bool:
    return param.ndim >= 2 and not _NO_DECAY.search(name)


def weight_decay_groups(model: nn.Module, lr: float, weight_decay: float, warmup_steps: int) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    common = dict(lr_base=lr, lr_scale=1.0, warmup_steps=warmup_steps)
    return [g for g in (dict(params=decay, weight_decay=weight_decay, **common),
                        dict(params=no_decay, weight_decay=0.0, **common)) if g["params"]]


def _unwrap(model: nn.Module) -> nn.Module:
    while True:  # DDP's .module, torch.compile's ._orig_mod
        inner = next((m for m in (getattr(model, a, None) for a in ("module", "_orig_mod"))
                      if isinstance(m, nn.Module)), None)
        if inner is None:
            return model
        model = inner


def _block_of(model: nn.Module) -> dict[int, int]:
    """{id(parameter): block index} from ``model.layer_id(name)`` when the model defines it, else by identity
    from ``model.blocks`` (so wrappers that rename parameters, e.g. activation checkpointing, do not matter)."""
    if hasattr(model, "layer_id"):
        return {id(p): i for n, p in model.named_parameters() if (i := model.layer_id(n)) is not None}
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential, list, tuple)):
        raise ValueError(f"layer-wise lr decay needs a model with a 'blocks' list or a layer_id(name) method; "
                         f"{type(model).__name__} has neither (set finetune.llrd=null to train without it)")
    return {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}


def llrd_groups(model: nn.Module, lr: float, weight_decay: float, warmup_steps: int, llrd: float,
                mode: str = "official", head_lr: Optional[float] = None) -> list[dict]:
    """Layer-wise lr decay groups for a ViT classifier (see the module docstring). Block parameters are found by
    identity from ``model.blocks`` (or ``model.layer_id(name)``), the others by their name relative to ``model``
    (DDP / torch.compile wrappers are unwrapped first)."""
    if mode not in ("official", "standard"):
        raise ValueError(f"layer decay mode must be 'official' or 'standard', got {mode!r}")
    model = _unwrap(model)
    block_of = _block_of(model)
    L = len(set(block_of.values()))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not any(id(p) in block_of for _, p in trainable):
        raise ValueError(f"layer-wise lr decay found no trainable block parameters in {type(model).__name__}; "
                         "pass the model itself (not a wrapper) or set finetune.llrd=null")
    groups: dict[tuple, dict] = {}
    for name, p in trainable:
        i = block_of.get(id(p))
        base = lr
        if mode == "official":
            if i is not None:
                scale = L - 1 - i
            elif name.startswith(("cls_token", "mask_token", "patch_embed")):
                scale = L
            elif name.startswith(("head.", "norm.")):
                scale, base = 0, (lr if head_lr is None else head_lr)
            else:  # fc_norm
                scale = 0
        else:
            layer_id = 0 if name.startswith(("cls_token", "mask_token", "patch_embed")) else (
                i + 1 if i is not None else L + 1)
            scale = L + 1 - layer_id
        f = llrd ** scale
        if mode == "official":
            w = max(1, warmup_steps - round(warmup_steps * min(f, 1.0)))
        else:
            w = warmup_steps
        wd = weight_decay if decays(name, p) else 0.0
        key = (base, scale, wd)
        g = groups.setdefault(key, dict(params=[], names=[], weight_decay=wd, lr_base=base, lr_scale=f,
                                        warmup_steps=w))
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


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
