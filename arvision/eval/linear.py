"""Linear probe on frozen features.

The features are standardised with the training mean and std (MAE's BatchNorm without affine before the head is the
same map at evaluation time), then an nn.Linear is trained on the in-memory features (no augmentation) with AdamW or
SGD + momentum and a per-step cosine schedule.

Learning-rate selection: when several lrs are given, each is trained on a random 90% of the training set and scored
on the held-out 10% (`val_fraction`); the best is retrained on the whole training set and only that model is scored
on the test set. The test set never takes part in the choice.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..train.logging import progress_bar
from .features import FeatureSpec, extract_features
from .knn import _num_classes, topk_accuracy

DEFAULT_LRS = {"adamw": (3e-4, 1e-3, 3e-3, 1e-2), "sgd": (0.01, 0.03, 0.1, 0.3)}


def _standardise(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    mean = train.mean(dim=0)
    std = (train.var(dim=0, unbiased=False) + eps).sqrt()
    return [(t - mean) / std for t in (train, *others)]


def held_out_split(n: int, val_fraction: float, seed: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) indices of a fixed random split of n training samples, for choosing a probe's lr without
    the test set."""
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} leaves no training samples for the lr sweep")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    return perm[n_val:], perm[:n_val]


def candidate_lrs(lr: Union[float, Sequence[float], None], default: Sequence[float]) -> list[float]:
    """The lrs a probe tries: ``default`` for None, one float as given, or a list."""
    lrs = list(default) if lr is None else [lr] if isinstance(lr, (int, float)) else list(lr)
    if not lrs:
        raise ValueError("lr is an empty list; give at least one learning rate or None for the default sweep")
    return lrs


def choose_lr(lrs: Sequence[float], n: int, val_fraction: float, seed: int, device,
              held_out_top1: Callable[[float, torch.Tensor, torch.Tensor], float]) -> tuple[float, dict]:
    """(the lr to train with, {lr: held-out top-1}): with several lrs, ``held_out_top1(lr, fit_idx, val_idx)`` scores
    a probe trained on the fit part of a fixed split of the n training samples (``held_out_split``) and the best
    wins (the earlier of equals); one lr is used as given, with an empty sweep."""
    if len(lrs) == 1:
        return lrs[0], {}
    fit_idx, val_idx = held_out_split(n, val_fraction, seed, device)
    sweep = {lr: held_out_top1(lr, fit_idx, val_idx) for lr in lrs}
    return max(lrs, key=lambda v: sweep[v]), sweep


def train_linear(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 1e-3,
                 weight_decay: float = 0.0, batch_size: int = 256, seed: int = 0,
                 optimizer: str = "adamw", bar=None) -> nn.Linear:
    """Fit a zero-initialised nn.Linear to (already standardised) features with a cosine lr schedule; ``bar`` (a
    progress bar) advances one per epoch."""
    gen = torch.Generator().manual_seed(seed)
    n, dim = feats.shape
    head = nn.Linear(dim, num_classes).to(feats.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    total = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    return fit_minibatches(head, opt, sched, feats, labels, epochs, batch_size, gen, bar)


def fit_minibatches(probe: nn.Module, opt: torch.optim.Optimizer, sched, inputs: torch.Tensor, labels: torch.Tensor,
                    epochs: int, batch_size: int, gen: torch.Generator, bar=None) -> nn.Module:
    """Train a probe with cross-entropy over ``epochs`` shuffled passes (order drawn from ``gen``), stepping the
    schedule every minibatch; ``bar`` advances one per epoch. Inputs are cast to float32 per batch (tokens are
    kept in bf16)."""
    n = inputs.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(inputs.device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            loss = F.cross_entropy(probe(inputs[idx].float()), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if bar is not None:
            bar.update()
    return probe


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: Optional[int] = None, epochs: int = 100,
                 lr: Union[float, Sequence[float], None] = None, weight_decay: float = 0.0, batch_size: int = 256,
                 seed: int = 0, optimizer: str = "adamw", val_fraction: float = 0.1,
                 device: Union[str, torch.device, None] = None, progress: bool = False) -> dict:
    """Train a linear classifier on frozen training features and report test accuracy (percent).

    `lr` None sweeps DEFAULT_LRS[optimizer]; a list is swept on a held-out `val_fraction` of train (see the module
    docstring); a single float is used directly. Deterministic given `seed`. `progress`: a bar over the epochs of
    the sweep and the final fit, with an ETA.
    Returns {'top1', 'top5', 'train_top1', 'best_lr', 'sweep' ({lr: held-out top1}), and the settings}.
    """
    if optimizer not in DEFAULT_LRS:
        raise ValueError(f"optimizer must be one of {sorted(DEFAULT_LRS)}, got {optimizer!r}")
    lrs = candidate_lrs(lr, DEFAULT_LRS[optimizer])
    if train_feats.shape[0] != train_labels.shape[0] or test_feats.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels differ in length; extract them from the same loader")
    device = torch.device(device) if device is not None else train_feats.device
    num_classes = num_classes or _num_classes(train_labels, test_labels)
    bar = progress_bar(desc="linear probe", total=epochs * (len(lrs) + 1 if len(lrs) > 1 else 1), enabled=progress,
                       unit="epoch")
    fit = dict(num_classes=num_classes, epochs=epochs, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
               optimizer=optimizer)
    # Inference tensors (from extract_features) cannot enter autograd: copy them into normal ones.
    with torch.inference_mode(False), torch.enable_grad():
        x_train, x_test = (t.detach().float().to(device).clone() for t in (train_feats, test_feats))
        y_train, y_test = (t.detach().long().to(device).clone() for t in (train_labels, test_labels))

        def held_out_top1(one_lr: float, fit_idx: torch.Tensor, val_idx: torch.Tensor) -> float:
            x_fit, x_val = _standardise(x_train[fit_idx], x_train[val_idx])
            head = train_linear(x_fit, y_train[fit_idx], lr=one_lr, bar=bar, **fit)
            with torch.no_grad():
                return topk_accuracy(head(x_val), y_train[val_idx], (1,))["top1"]

        best_lr, sweep = choose_lr(lrs, len(y_train), val_fraction, seed, device, held_out_top1)

        x_train, x_test = _standardise(x_train, x_test)
        head = train_linear(x_train, y_train, lr=best_lr, bar=bar, **fit)
        bar.close()
        with torch.no_grad():
            result = topk_accuracy(head(x_test), y_test)
            train_top1 = topk_accuracy(head(x_train), y_train, (1,))["top1"]
    return {**result, "train_top1": train_top1, "best_lr": best_lr, "sweep": sweep, **fit,
            "n_train": len(y_train), "n_test": len(y_test)}


def linear_eval(model: nn.Module, train_loader: Iterable, test_loader: Iterable, spec: Optional[FeatureSpec] = None,
                device: Union[str, torch.device, None] = None, amp_dtype: Optional[torch.dtype] = None,
                progress: bool = True, **probe_kwargs) -> dict:
    """Extract frozen features of both splits, then run `linear_probe` (keyword arguments pass through).

    Returns linear_probe's dict plus 'spec' (dict).
    """
    spec = spec or FeatureSpec()
    train = extract_features(model, train_loader, spec, device, amp_dtype, progress, "train features")
    test = extract_features(model, test_loader, spec, device, amp_dtype, progress, "test features")
    probe_kwargs.setdefault("device", device)
    probe_kwargs.setdefault("progress", progress)
    return {**linear_probe(*train, *test, **probe_kwargs), "spec": spec.to_dict()}
