"""AdamW parameter groups: weight decay on matrices only, and layer-wise lr decay (as MAE's ``util/lr_decay.py``).

Every group carries ``lr_base`` (its peak lr before scaling), ``lr_scale`` (f) and ``warmup_steps`` (w), which the
Trainer's schedule (``train.optim.lr_at``) reads.

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

import re
from typing import Callable, Optional

import torch
from torch import nn

from ..models.registry import unwrap

_NO_DECAY = re.compile(r"(bias|norm|layer_scale|ls\d\.gamma)")


def decays(name: str, param: torch.Tensor) -> bool:
    return param.ndim >= 2 and not _NO_DECAY.search(name)


def weight_decay_groups(model: nn.Module, lr: float, weight_decay: float, warmup_steps: int,
                        no_decay: Optional[Callable[[str], bool]] = None) -> list[dict]:
    """Two groups: the parameters ``decays`` picks (unless ``no_decay(name)``) with ``weight_decay``, the rest
    without."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) and not (no_decay and no_decay(name)) else rest).append(p)
    common = dict(lr_base=lr, lr_scale=1.0, warmup_steps=warmup_steps)
    return [g for g in (dict(params=decay, weight_decay=weight_decay, **common),
                        dict(params=rest, weight_decay=0.0, **common)) if g["params"]]


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
    model = unwrap(model)
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
