"""Kernel Inception Distance (Bińkowski et al. 2018), as torch-fidelity computes it.

KID is the unbiased estimate of the squared MMD between two feature sets under the polynomial kernel
k(x, y) = (gamma x.y + coef0) ** degree (degree 3, gamma 1 / D, coef0 1), averaged over ``subsets`` random subsets of
``subset_size`` rows drawn without replacement from each set (torch-fidelity's defaults: 100 subsets of 1000, the
draws from ``numpy.random.RandomState(2020)``, generated rows first then reference rows in each round). Unlike FID it
is unbiased in the number of samples, so small evaluations can be compared.

    mean, std = kernel_inception_distance(sample_feats, ref_feats)          # (N, D), (M, D)

When a set has fewer rows than ``subset_size`` (torch-fidelity refuses), the subsets take every row of the smaller
set's size; the size used is returned by ``kid_subset_size``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

KID_SUBSETS = 100  # torch-fidelity's kid_subsets
KID_SUBSET_SIZE = 1000  # torch-fidelity's kid_subset_size
KID_SEED = 2020  # torch-fidelity's rng_seed


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: Optional[float] = None,
                      coef0: float = 1.0) -> torch.Tensor:
    """(gamma x y^T + coef0) ** degree; gamma defaults to 1 / D."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: torch.Tensor, k_xy: torch.Tensor, k_yy: torch.Tensor) -> float:
    """Unbiased squared MMD from kernel matrices of m x m rows: the off-diagonal means of K_XX and K_YY minus twice
    the mean of K_XY (torch-fidelity's ``mmd_est='unbiased'``)."""
    m = k_xx.shape[0]
    off_xx = k_xx.sum() - k_xx.diagonal().sum()
    off_yy = k_yy.sum() - k_yy.diagonal().sum()
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid_subset_size(n_samples: int, n_ref: int, subset_size: int = KID_SUBSET_SIZE) -> int:
    return min(subset_size, n_samples, n_ref)


def kernel_inception_distance(samples: torch.Tensor, ref: torch.Tensor, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, degree: int = 3, gamma: Optional[float] = None,
                              coef0: float = 1.0, seed: int = KID_SEED) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over ``subsets`` random subsets (float64)."""
    x_all = torch.as_tensor(samples).detach().to("cpu", torch.float64)
    y_all = torch.as_tensor(ref).detach().to("cpu", torch.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"KID needs (N, D) features of the same D, got {tuple(x_all.shape)} and {tuple(y_all.shape)}")
    size = kid_subset_size(len(x_all), len(y_all), subset_size)
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples and 2 reference images, got {len(x_all)} and {len(y_all)}")
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        x = x_all[torch.from_numpy(rng.choice(len(x_all), size, replace=False))]
        y = y_all[torch.from_numpy(rng.choice(len(y_all), size, replace=False))]
        values.append(mmd2_unbiased(polynomial_kernel(x, x, degree, gamma, coef0),
                                    polynomial_kernel(x, y, degree, gamma, coef0),
                                    polynomial_kernel(y, y, degree, gamma, coef0)))
    return float(np.mean(values)), float(np.std(values))
