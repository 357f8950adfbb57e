"""Improved precision and recall (Kynkäänniemi et al. 2019): k-NN balls around each feature vector approximate
the real and the generated manifolds; precision is the fraction of generated samples inside the real manifold, recall
the fraction of real samples inside the generated one.

    res = precision_recall(real_features, fake_features, k=3)   # {"precision": ..., "recall": ...}

As ADM's evaluator (``ManifoldEstimator``, nhood_sizes=(3,)): the radius of a point is its distance to its k-th
nearest neighbour in its own set (the point itself not counted); a point is inside the other manifold if it lies
within the radius of at least one of that set's points. Distances are computed block by block (``batch_size`` rows
at a time against the whole set) on the features' device, never as a full N x N matrix.
"""
from __future__ import annotations

import torch


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (rows of a x rows of b), as ADM's DistanceBlock: |a|^2 - 2ab + |b|^2, >= 0."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = 3, batch_size: int = 10000) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest other row (N,)."""
    if len(features) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(features)}")
    return torch.cat([_sq_dists(features[i:i + batch_size], features).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(features), batch_size)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per point: whether it lies in at least one ball (centre, radius)."""
    out = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for i in range(0, len(points), batch_size):
        for j in range(0, len(centres), batch_size):
            d = _sq_dists(points[i:i + batch_size], centres[j:j + batch_size])
            out[i:i + batch_size] |= (d <= radii[None, j:j + batch_size]).any(1)
    return out


@torch.no_grad()
def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, batch_size: int = 10000,
                     device: str | torch.device | None = None) -> dict[str, float]:
    """Precision and recall of ``fake`` (N_f, D) against ``real`` (N_r, D) features, k-NN radii (k = 3 as in the
    paper and ADM). Computed in float32 on ``device`` (default: the features' device)."""
    real = torch.as_tensor(real).to(device or torch.as_tensor(real).device, torch.float32)
    fake = torch.as_tensor(fake).to(real.device, torch.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need (N, D) features of the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    r_real, r_fake = manifold_radii(real, k, batch_size), manifold_radii(fake, k, batch_size)
    precision = _inside(fake, real, r_real, batch_size).double().mean()
    recall = _inside(real, fake, r_fake, batch_size).double().mean()
    return {"precision": float(precision), "recall": float(recall)}
