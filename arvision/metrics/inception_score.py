"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits.

    mean, std = inception_score(logits=logits)        # (N, C) logits; softmax taken here
    mean, std = inception_score(probs=probs, splits=10)

The split indexing and the statistic follow the original improved-GAN TF code (and torch-fidelity): split i is
rows [i N // splits, (i + 1) N // splits), p(y) the mean of that split. ADM's evaluator feeds the Inception logits
*without* the final bias (torch-fidelity's ``logits_unbiased``); arvision's Inception extractor does the same.
"""
from __future__ import annotations

from typing import Optional

import torch


def inception_score(logits: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None,
                    splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the per-split scores. Give class logits or probabilities (N, C), N >= splits."""
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
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdim=True)
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, py)  # 0 log 0 = 0 for one-hot rows
        scores.append(kl.sum(1).mean().exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False)) if splits > 1 else 0.0
