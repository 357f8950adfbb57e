"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits.

    mean, std = inception_score(logits=logits)        # (N, C) logits; softmax taken here
    mean, std = inception_score(probs=probs, splits=10)

The split indexing and the statistic follow the original improved-GAN TF code (and torch-fidelity): split i is
rows [i N // splits, (i + 1) N // splits), p(y) the mean of that split. ADM's evaluator feeds the Inception logits
*without* the final bias (torch-fidelity's ``logits_unbiased``); arvision's Inception extractor does the same.

The score is a function of the set of samples, not of their order: before splitting, the rows are put in a canonical
order (sorted by their bytes) and shuffled with a fixed seed (2020, torch-fidelity's). Split in file order, samples
written class by class would give splits of one or a few classes each and a score capped near the number of classes
per split. ``shuffle=False`` splits in the given order (the improved-GAN code, ADM's evaluator).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

SHUFFLE_SEED = 2020  # torch-fidelity's isc_rng_seed


def inception_score(logits: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None,
                    splits: int = 10, shuffle: bool = True, seed: int = SHUFFLE_SEED) -> tuple[float, float]:
    """(mean, std) of the per-split scores. Give class logits or probabilities (N, C), N >= splits. The splits are
    drawn at random (fixed ``seed``) from a canonical order of the rows, unless ``shuffle`` is False."""
    if (logits is None) == (probs is None):
        raise ValueError("give exactly one of logits or probs")
    if logits is not None:
        p = torch.as_tensor(logits).detach().to("cpu", torch.float64).softmax(dim=1)
    else:
        p = torch.as_tensor(probs).detach().to("cpu", torch.float64)
        if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype), atol=1e-4):
            raise ValueError("probs must be non-negative rows summing to 1 (pass logits= for unnormalised scores)")
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"need (N, C) predictions with N >= splits={splits}, got shape {tuple(p.shape)}")
    if shuffle:
        p = p[set_order(p, seed)]
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdim=True)
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, py)  # 0 log 0 = 0 for one-hot rows
        scores.append(kl.sum(1).mean().exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False)) if splits > 1 else 0.0


def set_order(rows: torch.Tensor, seed: int = SHUFFLE_SEED) -> torch.Tensor:
    """A random order of ``rows`` (N, ...) that depends only on the multiset of rows and ``seed``: rows sorted by
    their bytes (identical rows are interchangeable), then permuted by a generator seeded with ``seed``."""
    flat = np.ascontiguousarray(rows.detach().cpu().reshape(len(rows), -1).numpy())
    canonical = np.argsort(flat.view(np.dtype((np.void, flat.dtype.itemsize * flat.shape[1]))).ravel(), kind="stable")
    return torch.from_numpy(canonical[np.random.RandomState(seed).permutation(len(rows))])
