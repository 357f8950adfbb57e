"""Frozen features for probing, selectable by block and pooling.

The final NEPA block specialises to the next-embedding target, so middle blocks often probe better (AIM probes
middle layers too). A `FeatureSpec` names the blocks to read and how to pool their tokens:

    spec = FeatureSpec.parse(blocks="middle", pool="mean", depth=len(model.blocks))
    feats, labels = extract_features(model, loader, spec, device="cuda", amp_dtype=torch.bfloat16)

Note: ``forward_features(x) == norm(last block output)``, so ``blocks=[-1], norm=True`` reads the same tokens as
``forward_features``; with ``norm=False`` the last block is read before the final LayerNorm.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn
from ..models.transformer import parse_blocks
from ..train.logging import progress_bar

POOLS = ("mean", "cls", "last")


@dataclass
class FeatureSpec:
    """Which block outputs to read and how to pool them.

    blocks: block indices (0-based, negative counts from the end; duplicates dropped); several blocks are averaged
        after pooling.
    pool: "mean" (mean of the patch tokens, CLS excluded), "cls" (token 0) or "last" (the last token).
    norm: apply the model's final LayerNorm to each block output before pooling.
    causal: attention mode during extraction; None keeps the model's default (``config.causal``).
    """
    blocks: list[int] = field(default_factory=lambda: [-1])
    pool: str = "mean"
    norm: bool = False
    causal: Optional[bool] = None

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if isinstance(self.blocks, int):
            self.blocks = [self.blocks]
        self.blocks = list(dict.fromkeys(int(b) for b in self.blocks))
        if not self.blocks:
            raise ValueError("FeatureSpec.blocks is empty; give at least one block index, e.g. [-1]")

    @classmethod
    def parse(cls, blocks: Union[str, int, Sequence[int]] = "-1", pool: str = "mean", norm: bool = False,
              causal: Optional[bool] = None, depth: Optional[int] = None) -> "FeatureSpec":
        """Build a spec from CLI-style text, read by the one block grammar of ``arvision.models.parse_blocks``:
        "3" (block 3), "-1", "2,3,4", "-4:" (a slice), "last", "middle" (index depth // 2: the first block of the
        second half, where probes of autoregressive models peak before the last blocks specialise to the target)
        or "all". With ``depth`` (``len(model.blocks)``) the indices are range-checked and made 0-based; without
        it only plain indices and "last" can be read."""
        if depth is not None:
            return cls(blocks=parse_blocks(blocks, depth), pool=pool, norm=norm, causal=causal)
        if isinstance(blocks, str):
            text = blocks.strip().lower()
            try:
                indices = [-1] if text == "last" else [int(t) for t in text.split(",") if t.strip()]
            except ValueError:
                raise ValueError(f"blocks={blocks!r} needs the model depth to be read (or is not a block selection); "
                                 "pass depth=len(model.blocks)") from None
        else:
            indices = [blocks] if isinstance(blocks, int) else [int(b) for b in blocks]
        return cls(blocks=list(dict.fromkeys(indices)), pool=pool, norm=norm, causal=causal)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"blocks={self.blocks} pool={self.pool} norm={self.norm} causal={self.causal}"


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """(B, T, D) token sequence -> (B, D) by the pooling named in `FeatureSpec.pool`."""
    if pool == "mean":
        return tokens[:, num_prefix_tokens:].mean(dim=1)
    if pool == "cls":
        return tokens[:, 0]
    if pool == "last":
        return tokens[:, -1]
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def block_tokens(model: nn.Module, images: torch.Tensor, spec: FeatureSpec, prefix: bool = True) -> list[torch.Tensor]:
    """The token sequences (B, [P +] N, D) of the blocks ``spec`` names, in the order it names them, the prefix
    (CLS) tokens first when ``prefix``; read through timm's ``forward_intermediates`` (block order, prefix split
    off), stopping after the last."""
    asked = parse_blocks(spec.blocks, len(model.blocks))
    outs = model.forward_intermediates(images, indices=asked, return_prefix_tokens=prefix, norm=spec.norm,
                                       stop_early=True, output_fmt="NLC", intermediates_only=True, causal=spec.causal)
    outs = [outs[sorted(asked).index(i)] for i in asked]  # block order -> the order asked
    return [torch.cat([cls, patches], dim=1) for patches, cls in outs] if prefix else outs


def pooled_features(model: nn.Module, images: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """Features (B, D) in float32 for one batch: each chosen block pooled, then averaged over blocks."""
    pooled = [pool_tokens(t.float(), spec.pool, model.num_prefix_tokens) for t in block_tokens(model, images, spec)]
    return torch.stack(pooled).mean(dim=0)


def _unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for xk, yk in (("image", "label"), ("images", "labels"), ("pixel_values", "labels")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
    raise ValueError("the data loader must yield (images, labels) pairs or dicts with 'image' and 'label'; "
                     f"got {type(batch).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def extract_features(model: nn.Module, loader: Iterable, spec: Optional[FeatureSpec] = None,
                     device: Union[str, torch.device, None] = None, amp_dtype: Optional[torch.dtype] = None,
                     progress: bool = True, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every sample in `loader`: (features float32 (N, D), labels int64 (N,)), both on CPU.

    Runs in eval mode under ``torch.inference_mode`` and restores the model's training mode afterwards. `device`
    None uses the model's device; otherwise the model is moved there. `amp_dtype` (e.g. torch.bfloat16) enables
    autocast. With `progress` a bar with an ETA (``desc``) shows on the main process.
    """
    spec = spec or FeatureSpec()
    return run_frozen(model, loader, lambda m, x: pooled_features(m, x, spec).float().cpu(), device, amp_dtype,
                      progress, desc)


def run_frozen(model: nn.Module, loader: Iterable, per_batch, device=None, amp_dtype: Optional[torch.dtype] = None,
               progress: bool = True, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """``per_batch(model, images)`` over every batch of `loader` in eval mode (autocast with `amp_dtype`), the
    results and the labels concatenated; the model's training mode is restored afterwards."""
    device = _model_device(model) if device is None else torch.device(device)
    model.to(device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for batch in progress_bar(loader, desc=desc, enabled=progress, unit="batch"):
            images, target = _unpack_batch(batch)
            with amp:
                feats.append(per_batch(model, images.to(device, non_blocking=True)))
            labels.append(torch.as_tensor(target).long().cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("the data loader yielded no batches; check the dataset path and split")
    return torch.cat(feats), torch.cat(labels)
