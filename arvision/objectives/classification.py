"""Supervised classification objective for fine-tuning (nepa_spec.md §5.1-§5.2).

timm's Mixup / CutMix (label smoothing folded into the soft targets) runs on the device inside ``forward``, on the
micro-batch that reaches the model, instead of in the CPU collate function as in the official code. The loss is the
soft-target cross-entropy in fp32, -sum(y * log_softmax(logits)) averaged over the batch; without mixing it is the
label-smoothed cross-entropy, which is the same thing for one-hot targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from ..typed_config import ConfigDict
from .base import Objective
from .param_groups import llrd_groups

MIXUP_MODES = ("batch", "pair", "elem")
LLRD_MODES = ("official", "standard")


@dataclass
class ClassificationConfig(ConfigDict):
    """What the classification objective reads of a task's ``finetune:`` block (defaults: the official recipe)."""
    mixup: float = 0.8                # Mixup Beta alpha (0: off)
    cutmix: float = 1.0               # CutMix Beta alpha (0: off); both 0: label-smoothed cross-entropy, no mixing
    mixup_prob: float = 1.0           # probability of mixing a batch
    mixup_switch_prob: float = 0.5    # probability of CutMix instead of Mixup when both are on
    mixup_mode: str = "batch"         # batch | pair | elem (timm Mixup)
    label_smoothing: float = 0.1      # folded into the soft targets
    causal: bool = False              # attention of the fine-tuning forward (official: bidirectional)
    llrd: Optional[float] = None      # layer-wise lr decay factor (param_groups.llrd_groups); None: weight decay only
    llrd_mode: str = "official"       # official | standard (see llrd_groups)
    head_lr: Optional[float] = None   # official mode: lr of the classifier and the final norm; None: the lr

    def __post_init__(self):
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"finetune.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for key in ("mixup", "cutmix"):
            if getattr(self, key) < 0:
                raise ValueError(f"finetune.{key} must be >= 0 (0: off), got {getattr(self, key)}")
        for key in ("mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"finetune.{key} must be in [0, 1], got {getattr(self, key)}")
        for key, allowed in (("mixup_mode", MIXUP_MODES), ("llrd_mode", LLRD_MODES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"finetune.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.llrd is not None and not 0 < self.llrd <= 1:
            raise ValueError(f"finetune.llrd must be in (0, 1] (1: no decay) or null, got {self.llrd}")


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-sum(y * log_softmax(logits)) per sample, averaged over the batch; computed in fp32."""
    return torch.sum(-targets.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class ClassificationObjective(Objective):
    """``objective(images, labels) -> (loss, {"top1": ...})`` for the Trainer; ``model`` is the classifier.

    ``config``: a ``ClassificationConfig`` (default: the official recipe); keyword ``changes`` replace its fields:

        ClassificationObjective(model, 10, ClassificationConfig.from_section(cfg.finetune))
        ClassificationObjective(model, 10, mixup=0, cutmix=0, label_smoothing=0)   # plain cross-entropy
    """

    def __init__(self, model: nn.Module, num_classes: int, config: Optional[ClassificationConfig] = None,
                 **changes):
        super().__init__()
        self.config = c = (config or ClassificationConfig()).updated(**changes)
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got num_classes={num_classes}")
        self.model, self.num_classes = model, num_classes
        self.causal, self.label_smoothing = c.causal, c.label_smoothing
        self.mixup = None
        if (c.mixup > 0 or c.cutmix > 0) and c.mixup_prob > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, prob=c.mixup_prob,
                               switch_prob=c.mixup_switch_prob, mode=c.mixup_mode, correct_lam=True,
                               label_smoothing=c.label_smoothing, num_classes=num_classes)

    @torch.no_grad()
    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, soft targets (B, K) in fp32). Mixes ``images`` in place, as timm does.

        timm draws from NumPy's global RNG; it is seeded here from the torch RNG (which checkpoints save and
        restore, so a resumed run mixes identically) plus the rank (so ranks mix differently), then restored."""
        if self.mixup is None:
            return images, F.one_hot(labels, self.num_classes).float() * (1 - self.label_smoothing) + (
                self.label_smoothing / self.num_classes)
        if images.shape[0] % 2:
            raise ValueError(f"mixup/cutmix needs an even micro-batch, got {images.shape[0]}; change "
                             "train.batch_size / train.micro_batch_size or set finetune.mixup=0 finetune.cutmix=0")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = int(torch.randint(0, 2**31 - 1, ())) + 7919 * rank
        state = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            return self.mixup(images, labels)
        finally:
            np.random.set_state(state)

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        if self.mixup is None:
            logits = self.model(images, causal=self.causal)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            top1 = (logits.argmax(-1) == labels).float().mean() * 100
            return loss, {"top1": top1}
        images, targets = self.mix(images, labels)
        logits = self.model(images, causal=self.causal)
        loss = soft_target_cross_entropy(logits, targets)
        top1 = (logits.argmax(-1) == targets.argmax(-1)).float().mean() * 100  # against the dominant mixed label
        return loss, {"top1": top1}

    def param_groups(self, lr: float, weight_decay: float, warmup_steps: int) -> list[dict]:
        c = self.config
        if c.llrd is None:
            return super().param_groups(lr, weight_decay, warmup_steps)
        return llrd_groups(self.model, lr, weight_decay, warmup_steps, c.llrd, c.llrd_mode, c.head_lr)
