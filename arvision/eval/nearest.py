"""Are samples copies of training images? The nearest-training-image check: for every sample, the pixel L2 distance
(images in [0, 1]) to its nearest image of the training set, set beside the same distance for images the model never
trained on (e.g. the tokenizer's reconstructions of test images, ``arvision tokenizer eval --save-recon``). Copies
sit far below that baseline; a generator that learned the distribution sits on it.

    arvision eval nearest samples.npz /data/cifar10 --baseline recon_test.npz --grid nearest.png

``d^2 = |a|^2 + |t|^2 - 2 a.t`` over blocks of samples against chunks of the training set (float64 norms, float32
dot products), then the minimum over the training images; of the training set one chunk is held at a time.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .generative import collate_images

QUERY_BLOCK = 1000
REFERENCE_CHUNK = 5000
QUANTILES = (0.01, 0.05, 0.5)


def _rows(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> float32 (n, 3*H*W) in [0, 1]."""
    return images.reshape(len(images), -1).float().div_(255)


def _stack(ds: Dataset, batch_size: int = 500, num_workers: int = 0) -> torch.Tensor:
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
    return torch.cat(list(loader))


@torch.no_grad()
def nearest_training_images(queries: Dataset, training: Dataset, num_workers: int = 0,
                            progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each query's nearest training image: datasets of uint8 (3, H, W) tensors of one size
    (``arvision.eval.generative.open_images``). Distances are pixel L2 in [0, 1] units."""
    from ..train.logging import progress_bar

    if len(training) and len(queries) and training[0].shape != queries[0].shape:
        raise ValueError(f"samples and training images differ in size ({tuple(queries[0].shape)} against "
                         f"{tuple(training[0].shape)}); pass --image-size N to centre-crop both to N px")
    q = _rows(_stack(queries, num_workers=num_workers))
    q_sq = q.double().pow(2).sum(1)
    best = torch.full((len(q),), float("inf"), dtype=torch.float64)
    index = torch.zeros(len(q), dtype=torch.long)
    loader = DataLoader(training, batch_size=REFERENCE_CHUNK, num_workers=num_workers, collate_fn=collate_images)
    offset = 0
    for chunk in progress_bar(loader, desc="training images", enabled=progress, unit="chunk"):
        t = _rows(chunk)
        t_sq = t.double().pow(2).sum(1)
        for s in range(0, len(q), QUERY_BLOCK):
            d2 = q_sq[s:s + QUERY_BLOCK, None] + t_sq[None] - 2 * (q[s:s + QUERY_BLOCK] @ t.T).double()
            d2_min, i_min = d2.min(1)
            closer = d2_min < best[s:s + QUERY_BLOCK]
            best[s:s + QUERY_BLOCK] = torch.where(closer, d2_min, best[s:s + QUERY_BLOCK])
            index[s:s + QUERY_BLOCK] = torch.where(closer, i_min + offset, index[s:s + QUERY_BLOCK])
        offset += len(t)
    return best.clamp_min(0).sqrt().float(), index


def distance_summary(distances: torch.Tensor, baseline: Optional[torch.Tensor] = None) -> dict:
    """Mean and quantiles of the nearest distances; with a baseline's distances, its quantiles and the fraction of
    samples nearer to the training set than the baseline's 1st percentile (about 1% for a generator that copies
    nothing; copies push it up)."""
    d = distances.double().numpy()
    out = {"num": len(d), "mean": float(d.mean()), **{f"q{round(100 * p):02d}": float(np.quantile(d, p))
                                                      for p in QUANTILES}}
    if baseline is not None:
        b = baseline.double().numpy()
        out["baseline"] = {"num": len(b), "mean": float(b.mean()),
                           **{f"q{round(100 * p):02d}": float(np.quantile(b, p)) for p in QUANTILES}}
        out["below_baseline_q01"] = float((d < np.quantile(b, 0.01)).mean())
    return out
