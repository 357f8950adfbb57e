"""Semantic segmentation objective (mmseg / BEiT / MAE ADE20K): pixel cross-entropy with ``ignore_index`` on the decode
head's logits plus ``aux_weight`` (0.4) times the auxiliary FCN head's, both at the mask resolution. Each is the
mean over the labelled pixels of the micro-batch; a micro-batch whose pixels are all ignored adds 0 (metric
``all_ignored``: the share of such micro-batches), not NaN.

    objective = SegmentationObjective(segmentor, SegmentationConfig(aux_weight=0.4, llrd=0.65, head_lr_scale=1.0))
    loss, metrics = objective(images, masks)       # images (B, 3, H, W), masks (B, H, W) int64
                                                   # (ignore_index, default 255: pixels that count for nothing)
    groups = objective.param_groups(lr=1e-4, weight_decay=0.05, warmup_steps=1500)

Parameter groups: MAE/BEiT layer-wise lr decay over the backbone (``param_groups.llrd_groups``, standard mode:
the embeddings get llrd^(L+1), block i llrd^(L-i), the final norm 1), and the neck and heads at ``head_lr_scale`` x
the base lr (MAE: 1; some BEiT / mmseg configs use 10). Weight decay on matrices and convolutions only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..models.segmentation import IGNORE_INDEX, check_ignore_index
from ..typed_config import ConfigDict
from .base import Objective
from .param_groups import llrd_groups, weight_decay_groups


@dataclass
class SegmentationConfig(ConfigDict):
    """What the segmentation objective reads of a task's ``segment:`` block (defaults: MAE/BEiT ADE20K)."""
    aux_weight: float = 0.4              # weight of the auxiliary FCN head's loss (0: off)
    ignore_index: Optional[int] = None   # label left out of loss and metrics; None: the segmentor's
    llrd: Optional[float] = 0.65         # layer-wise lr decay over the backbone (standard mode); None: none
    head_lr_scale: float = 1.0           # neck and heads at this x the base lr

    def __post_init__(self):
        if self.aux_weight < 0:
            raise ValueError(f"segment.aux_weight must be >= 0 (0: off), got {self.aux_weight}")
        if self.head_lr_scale <= 0:
            raise ValueError(f"segment.head_lr_scale must be > 0, got {self.head_lr_scale}")
        if self.llrd is not None and not 0 < self.llrd <= 1:
            raise ValueError(f"segment.llrd must be in (0, 1] (1: no decay) or null, got {self.llrd}")


def masked_cross_entropy(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int,
                         labelled: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pixel cross-entropy averaged over the pixels whose label is not ``ignore_index`` (``labelled``: their count,
    if known): ``F.cross_entropy``'s mean, but 0 (not 0 / 0 = NaN) for a batch whose pixels are all ignored, so that
    such a batch adds nothing to the loss and its gradients are zeros."""
    if labelled is None:
        labelled = (masks != ignore_index).sum()
    total = F.cross_entropy(logits.float(), masks, ignore_index=ignore_index, reduction="sum")
    return total / labelled.clamp_min(1)


class SegmentationObjective(Objective):
    """``config``: a ``SegmentationConfig``; keyword ``changes`` replace its fields (``llrd=0.5``)."""

    def __init__(self, model: nn.Module, config: Optional[SegmentationConfig] = None, **changes):
        super().__init__()
        self.config = c = (config or SegmentationConfig()).updated(**changes)
        # None: the segmentor's (segment.ignore_index when the task built it)
        ignore_index = c.ignore_index if c.ignore_index is not None else getattr(model.config, "ignore_index",
                                                                                 IGNORE_INDEX)
        check_ignore_index(ignore_index, model.config.num_classes)
        self.model, self.aux_weight, self.ignore_index = model, c.aux_weight, ignore_index
        self.llrd, self.head_lr_scale = c.llrd, c.head_lr_scale

    def forward(self, images: torch.Tensor, masks: torch.Tensor):
        if masks.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"masks of shape {tuple(masks.shape)} do not match images of shape {tuple(images.shape)};"
                             " a mask must be (H, W) at its image's size")
        if self.training and images.shape[0] < 2 and self.model.config.head == "upernet":
            raise ValueError("UperNet's BatchNorm needs at least 2 images per process and micro-batch; raise "
                             "train.batch_size / train.micro_batch_size")
        logits, aux = self.model(images, return_aux=True)
        valid = masks != self.ignore_index
        labelled = valid.sum()
        loss = masked_cross_entropy(logits, masks, self.ignore_index, labelled)
        metrics = {"decode_loss": loss.detach()}
        if aux is not None and self.aux_weight > 0:
            aux_loss = masked_cross_entropy(aux, masks, self.ignore_index, labelled)
            metrics["aux_loss"] = aux_loss.detach()
            loss = loss + self.aux_weight * aux_loss
        hits = (logits.detach().argmax(1) == masks) & valid
        metrics["pixel_acc"] = hits.sum() * 100.0 / labelled.clamp_min(1)  # no host sync
        metrics["all_ignored"] = (labelled == 0).float()  # the share of micro-batches with no labelled pixel
        return loss, metrics

    def param_groups(self, lr: float, weight_decay: float, warmup_steps: int) -> list[dict]:
        backbone = self.model.backbone
        if self.llrd is None:
            groups = weight_decay_groups(backbone, lr, weight_decay, warmup_steps)
        else:
            groups = llrd_groups(backbone, lr, weight_decay, warmup_steps, self.llrd, mode="standard")
        heads = nn.ModuleDict({n: m for n, m in self.model.named_children() if m is not backbone})
        groups += weight_decay_groups(heads, lr * self.head_lr_scale, weight_decay, warmup_steps)
        return groups
