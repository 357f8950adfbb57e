"""Attentive probe on frozen token features (AIM, El-Nouby et al. 2024, §3; V-JEPA's attentive pooler).

A linear probe reads one pooled vector; an autoregressive model spreads what it knows over its tokens (a causal
token sees only its prefix), so AIM probes with a learned query that cross-attends to all patch tokens of a frozen
block, then a linear classifier on the attended vector:

    a = softmax(q K^T / sqrt(d)) V,  K = LN(X) W_k,  V = LN(X) W_v,  logits = W_o LN(a)    (per head, concatenated)

Only q, W_k, W_v, the norms and W_o are trained; the backbone's token features are extracted once (kept in bf16 in
memory). Learning-rate selection is the linear probe's: each lr is trained on 90% of the training set and scored on
the held-out 10%; the best is retrained on all of it; the test set never takes part in the choice.

    train = extract_tokens(model, train_loader, FeatureSpec.parse("middle", depth=len(model.blocks)))
    test = extract_tokens(model, test_loader, spec)
    attentive_probe(*train, *test, epochs=20)["top1"]
    # or: arvision eval attentive CHECKPOINT --data /data/cifar10 --blocks middle
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..train.logging import progress_bar
from .features import FeatureSpec, block_tokens, run_frozen
from .knn import _num_classes, topk_accuracy
from .linear import candidate_lrs, choose_lr, fit_minibatches

DEFAULT_LRS = (3e-4, 1e-3, 3e-3)


class AttentivePooler(nn.Module):
    """A learned query cross-attending to (B, T, D) tokens, then LayerNorm and a linear classifier."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"token width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm_in = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T, D = tokens.shape
        h = self.num_heads
        k, v = self.kv(self.norm_in(tokens)).view(B, T, 2, h, D // h).permute(2, 0, 3, 1, 4)
        q = self.query.expand(B, -1, -1).view(B, 1, h, D // h).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, D)
        return self.head(self.norm_out(pooled))


@torch.inference_mode()
def extract_tokens(model: nn.Module, loader: Iterable, spec: Optional[FeatureSpec] = None,
                   device: Union[str, torch.device, None] = None, amp_dtype: Optional[torch.dtype] = None,
                   progress: bool = True, desc: str = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen patch tokens of every sample: (bf16 (N, T, D), labels (N,)) on the CPU; several blocks are averaged.
    ``spec.pool`` is ignored (the probe pools); the prefix (CLS) token is dropped."""
    spec = spec or FeatureSpec()

    def tokens(m: nn.Module, images: torch.Tensor) -> torch.Tensor:
        outs = block_tokens(m, images, spec, prefix=False)
        return torch.stack([o.float() for o in outs]).mean(dim=0).to(torch.bfloat16).cpu()

    return run_frozen(model, loader, tokens, device, amp_dtype, progress, desc)


def train_attentive(tokens: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 20, lr: float = 1e-3,
                    weight_decay: float = 0.05, batch_size: int = 256, num_heads: int = 4,
                    seed: int = 0, bar=None) -> AttentivePooler:
    """Fit an AttentivePooler with AdamW, a linear warmup over the first epoch and a per-step cosine decay; ``bar``
    (a progress bar) advances one per epoch."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = AttentivePooler(tokens.shape[-1], num_classes, num_heads).to(tokens.device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    n = tokens.shape[0]
    per_epoch = math.ceil(n / batch_size)
    total, warmup = epochs * per_epoch, per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return fit_minibatches(probe, opt, sched, tokens, labels, epochs, batch_size, gen, bar)


@torch.no_grad()
def _predict(probe: AttentivePooler, tokens: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([probe(tokens[i:i + batch_size].float()) for i in range(0, tokens.shape[0], batch_size)])


def attentive_probe(train_tokens: torch.Tensor, train_labels: torch.Tensor, test_tokens: torch.Tensor,
                    test_labels: torch.Tensor, num_classes: Optional[int] = None, epochs: int = 20,
                    lr: Union[float, Sequence[float], None] = None, weight_decay: float = 0.05,
                    batch_size: int = 256, num_heads: int = 4, seed: int = 0, val_fraction: float = 0.1,
                    device: Union[str, torch.device, None] = None, progress: bool = False) -> dict:
    """Train an attentive probe on frozen tokens (N, T, D) and report test accuracy (percent).

    ``lr`` None sweeps DEFAULT_LRS on a held-out ``val_fraction`` of train; a list is swept the same way; a float is
    used directly. Deterministic given ``seed``; ``progress``: a bar with an ETA over every epoch trained. Returns {'top1', 'top5', 'train_top1', 'best_lr', 'sweep', ...}."""
    lrs = candidate_lrs(lr, DEFAULT_LRS)
    if train_tokens.dim() != 3 or test_tokens.dim() != 3:
        raise ValueError(f"attentive_probe takes token features (N, T, D); got {tuple(train_tokens.shape)} and "
                         f"{tuple(test_tokens.shape)} (use extract_tokens, not extract_features)")
    if train_tokens.shape[0] != train_labels.shape[0] or test_tokens.shape[0] != test_labels.shape[0]:
        raise ValueError("tokens and labels differ in length; extract them from the same loader")
    device = torch.device(device) if device is not None else train_tokens.device
    num_classes = num_classes or _num_classes(train_labels, test_labels)
    bar = progress_bar(desc="attentive probe", total=epochs * (len(lrs) + 1 if len(lrs) > 1 else 1),
                       enabled=progress, unit="epoch")
    fit = dict(num_classes=num_classes, epochs=epochs, weight_decay=weight_decay, batch_size=batch_size,
               num_heads=num_heads, seed=seed)
    with torch.inference_mode(False), torch.enable_grad():  # inference tensors cannot enter autograd: copy them
        x_train, x_test = (t.detach().to(device).clone() for t in (train_tokens, test_tokens))
        y_train, y_test = (t.detach().long().to(device).clone() for t in (train_labels, test_labels))
        def held_out_top1(one_lr: float, fit_idx: torch.Tensor, val_idx: torch.Tensor) -> float:
            probe = train_attentive(x_train[fit_idx], y_train[fit_idx], lr=one_lr, bar=bar, **fit)
            return topk_accuracy(_predict(probe, x_train[val_idx]), y_train[val_idx], (1,))["top1"]

        best_lr, sweep = choose_lr(lrs, len(y_train), val_fraction, seed, device, held_out_top1)
        probe = train_attentive(x_train, y_train, lr=best_lr, bar=bar, **fit)
        bar.close()
        result = topk_accuracy(_predict(probe, x_test), y_test)
        train_top1 = topk_accuracy(_predict(probe, x_train), y_train, (1,))["top1"]
    return {**result, "train_top1": train_top1, "best_lr": best_lr, "sweep": sweep, **fit,
            "n_train": len(y_train), "n_test": len(y_test)}


def attentive_eval(model: nn.Module, train_loader: Iterable, test_loader: Iterable,
                   spec: Optional[FeatureSpec] = None, device: Union[str, torch.device, None] = None,
                   amp_dtype: Optional[torch.dtype] = None, progress: bool = True, **probe_kwargs) -> dict:
    """Extract frozen tokens of both splits, then run ``attentive_probe`` (keyword arguments pass through)."""
    spec = spec or FeatureSpec()
    train = extract_tokens(model, train_loader, spec, device, amp_dtype, progress, "train tokens")
    test = extract_tokens(model, test_loader, spec, device, amp_dtype, progress, "test tokens")
    probe_kwargs.setdefault("device", device)
    probe_kwargs.setdefault("progress", progress)
    return {**attentive_probe(*train, *test, **probe_kwargs), "spec": spec.to_dict()}
