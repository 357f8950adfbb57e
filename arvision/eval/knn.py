"""Weighted k-nearest-neighbour classification on frozen features, as in DINO (Caron et al. 2021).

Features are L2-normalised; each test sample takes its k most cosine-similar training samples, and each neighbour
votes for its class with weight exp(similarity / T). Accuracy is in percent.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from .features import FeatureSpec, extract_features


def _num_classes(*labels: torch.Tensor) -> int:
    return int(max(int(t.max()) for t in labels if t.numel())) + 1


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int = 20,
               temperature: float = 0.07, num_classes: Optional[int] = None, chunk: int = 1024) -> torch.Tensor:
    """Class vote scores (N_test, C): sum over the k nearest neighbours of exp(cos_sim / T) per neighbour class.

    Computed in chunks of `chunk` test samples so memory stays O(chunk * N_train).
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be 2D with the same width; got train {tuple(train_feats.shape)} "
                         f"and test {tuple(test_feats.shape)}")
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} training features but {train_labels.shape[0]} training labels")
    n_train = train_feats.shape[0]
    if not 1 <= k <= n_train:
        raise ValueError(f"k={k} must be between 1 and the number of training samples ({n_train})")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    num_classes = num_classes or _num_classes(train_labels)
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float().to(train.device), dim=1)
    train_labels = train_labels.long().to(train.device)
    scores = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent ({'top1': .., 'top5': ..}); k is capped at the number of classes."""
    labels = labels.to(scores.device)
    maxk = min(max(ks), scores.shape[1])
    pred = scores.topk(maxk, dim=1).indices
    correct = pred.eq(labels.view(-1, 1))
    n = max(labels.numel(), 1)
    return {f"top{k}": 100.0 * correct[:, :min(k, maxk)].any(dim=1).sum().item() / n for k in ks}


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: Optional[int] = None,
                 chunk: int = 1024) -> dict[str, float]:
    """DINO's weighted kNN: {'top1', 'top5'} accuracy in percent on the test features."""
    num_classes = num_classes or _num_classes(train_labels, test_labels)
    scores = knn_scores(train_feats, train_labels, test_feats, k, temperature, num_classes, chunk)
    return topk_accuracy(scores, test_labels)


def knn_eval(model: nn.Module, train_loader: Iterable, test_loader: Iterable, spec: Optional[FeatureSpec] = None,
             k: int = 20, temperature: float = 0.07, device: Union[str, torch.device, None] = None,
             amp_dtype: Optional[torch.dtype] = None, num_classes: Optional[int] = None,
             progress: bool = True) -> dict:
    """Extract frozen features of both splits, then kNN-classify the test split.

    Returns {'top1', 'top5', 'k', 'temperature', 'spec' (dict), 'n_train', 'n_test'}.
    """
    spec = spec or FeatureSpec()
    train_feats, train_labels = extract_features(model, train_loader, spec, device, amp_dtype, progress, "train features")
    test_feats, test_labels = extract_features(model, test_loader, spec, device, amp_dtype, progress, "test features")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    result = knn_classify(train_feats.to(dev), train_labels.to(dev), test_feats.to(dev), test_labels.to(dev),
                          k, temperature, num_classes)
    return {**result, "k": k, "temperature": temperature, "spec": spec.to_dict(),
            "n_train": len(train_labels), "n_test": len(test_labels)}
