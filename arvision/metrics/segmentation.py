"""Semantic segmentation metrics from a dataset-level confusion matrix, as mmseg computes them.

    res = mean_iou(pred, target, num_classes=150)        # {"mIoU", "mAcc", "aAcc", "IoU", "Acc"}
    cm = ConfusionMatrix(150, device="cuda")
    for images, masks in loader:
        cm.update(model(images).argmax(1), masks)        # on the device, no host sync unless validate=True
    cm.all_reduce()                                      # sum over torch.distributed processes
    res = cm.compute()

Definitions (mmseg ``total_area_to_metrics``): with intersect_c = CM[c, c], area_label_c = row sum, area_pred_c =
column sum, IoU_c = intersect_c / (area_label_c + area_pred_c - intersect_c), Acc_c = intersect_c / area_label_c,
aAcc = sum intersect / sum area_label. A class absent from both prediction and target has IoU nan and is left out of
mIoU (nanmean); a class absent from the target has Acc nan. Values are fractions in [0, 1]. Pixels whose target is
``ignore_index`` (default 255; one inside the class range is an error) are not counted.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..models.segmentation import IGNORE_INDEX, check_ignore_index


class ConfusionMatrix:
    """(num_classes, num_classes) int64 counts, rows = target class, columns = predicted class, kept on ``device``."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: str | torch.device = "cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        check_ignore_index(ignore_index, num_classes)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, validate: bool = True) -> "ConfusionMatrix":
        """Add a batch of predicted class indices and targets of the same shape (e.g. (B, H, W))."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}; "
                             "pass class indices (argmax over the class dimension) at the mask resolution")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must hold integer class indices")
        c = self.num_classes
        pred, target = pred.to(self.mat.device).reshape(-1).long(), target.to(self.mat.device).reshape(-1).long()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if validate:  # one host sync; pass validate=False inside hot loops whose labels are known to be valid
            bad_t, bad_p = ((target < 0) | (target >= c)).any(), ((pred < 0) | (pred >= c)).any()
            if bool(bad_t) or bool(bad_p):
                which = "target" if bool(bad_t) else "prediction"
                vals = (target if which == "target" else pred)
                raise ValueError(f"{which} labels out of range [0, {c}) (min {int(vals.min())}, max {int(vals.max())}) "
                                 f"and not ignore_index={self.ignore_index}; check num_classes and the label mapping "
                                 "(e.g. reduce-zero-label for ADE20K)")
        self.mat += torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)
        return self

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the counts over all processes (no-op without an initialised process group)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)
        return self

    def compute(self) -> dict:
        return metrics_from_confusion(self.mat)


def metrics_from_confusion(mat: torch.Tensor) -> dict:
    """mIoU, mAcc, aAcc (floats) and per-class IoU, Acc (float64 CPU tensors, nan where undefined)."""
    m = mat.detach().to("cpu", torch.float64)
    intersect, area_label, area_pred = m.diagonal(), m.sum(1), m.sum(0)
    union = area_label + area_pred - intersect
    iou = intersect / union  # 0 / 0 -> nan: class in neither prediction nor target
    acc = intersect / area_label
    total = area_label.sum()
    return {"mIoU": _nanmean(iou), "mAcc": _nanmean(acc),
            "aAcc": float(intersect.sum() / total) if total > 0 else math.nan, "IoU": iou, "Acc": acc}


def _nanmean(x: torch.Tensor) -> float:
    return float(x.nanmean()) if (~x.isnan()).any() else math.nan


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> dict:
    """Segmentation metrics of predicted class indices against targets (any matching shapes); see the module doc."""
    return ConfusionMatrix(num_classes, ignore_index, device=pred.device).update(pred, target).compute()
