"""Sample accuracy of a class-conditional generator: the fraction of samples that a classifier trained on real images
assigns to the class they were generated for (the "classification accuracy score" idea of Ravuri & Vinyals 2019,
read the other way round, as in the CAS-style checks of conditional GANs). Report it beside the classifier's own
accuracy on held-out real images: a sample cannot be judged more reliably than the judge.

    acc = sample_accuracy(judge_logits, labels)      # in [0, 1]; a perfect judge of perfect samples gives 1
"""
from __future__ import annotations

import torch


def sample_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit equals the conditioning label; logits (N, C), labels (N,)."""
    labels = torch.as_tensor(labels).long().flatten()
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"need logits (N, C) for N labels, got {tuple(logits.shape)} for {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("no samples to score")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels {int(labels.min())}..{int(labels.max())} are outside the classifier's "
                         f"{logits.shape[1]} classes: the judge must classify the generator's classes")
    return (logits.argmax(dim=1) == labels).double().mean().item()
