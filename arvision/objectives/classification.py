"""Supervised classification objective for fine-tuning (nepa_spec.md §5.1-§5.2).

timm's Mixup / CutMix (label smoothing folded into the soft targets) runs on the device inside ``forward``, on the
micro-batch that reaches the model, instead of in the CPU collate function as in the official code. The loss is the
soft-target cross-entropy in fp32, -sum(y * log_softmax(logits)) averaged over the batch; without mixing it is the
label-smoothed cross-entropy, which is the same thing for one-hot targets.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from .base import Objective
from .param_groups import llrd_groups


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-sum(y * log_softmax(logits)) per sample, averaged over the batch; computed in fp32."""
    return torch.sum(-targets.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class ClassificationObjective(Objective):
    """``objective(images, labels) -> (loss, {"top1": ...})`` for the Trainer; ``model`` is the classifier.

    mixup / cutmix: Beta alphas (0 disables each; both 0 disables mixing). mixup_prob: probability of mixing a
    batch; switch_prob: probability of CutMix when both are on; mode: timm's 'batch' | 'pair' | 'elem'.
    causal: attention mode of the fine-tuning forward (official: bidirectional).
    llrd: layer-wise lr decay factor for ``param_groups`` (``param_groups.llrd_groups`` with ``llrd_mode`` and
    ``head_lr``); None gives plain weight-decay groups.
    """

    def __init__(self, model: nn.Module, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0,
                 label_smoothing: float = 0.1, mixup_prob: float = 1.0, switch_prob: float = 0.5,
                 mode: str = "batch", causal: bool = False, llrd: Optional[float] = None,
                 llrd_mode: str = "official", head_lr: Optional[float] = None):
        super().__init__()
        self.llrd, self.llrd_mode, self.head_lr = llrd, llrd_mode, head_lr
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got num_classes={num_classes}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.model, self.num_classes, self.causal = model, num_classes, causal
        self.label_smoothing = label_smoothing
        self.mixup = None
        if (mixup > 0 or cutmix > 0) and mixup_prob > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=switch_prob,
                               mode=mode, correct_lam=True, label_smoothing=label_smoothing, num_classes=num_classes)

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
        if self.llrd is None:
            return super().param_groups(lr, weight_decay, warmup_steps)
        return llrd_groups(self.model, lr, weight_decay, warmup_steps, self.llrd, self.llrd_mode, self.head_lr)
