"""Segmentation inference (whole image, sliding window, flip and multi-scale TTA), the dataset evaluation loop and
colour overlays.

    probs = inference(model, images, mode="slide", crop=512, stride=341, flip=True, ratios=(0.75, 1.0, 1.25))
    res = evaluate_segmentation(model, val_set, num_classes=150, mode="slide", crop=512, stride=341)
    # {"mIoU", "mAcc", "aAcc" (percent), "IoU": {class: percent}, "Acc": {...}, "n"}
    write_overlay(image, pred, classes, palette, "out/a.png")   # image blended with class colours + a legend

Sliding window (mmseg ``slide_inference``): windows of ``crop`` every ``stride`` pixels, the last one flush with the
border; each window's logits are added into the full-size map and divided by the count of windows covering each
pixel. Test-time augmentation (mmseg ``aug_test``): the image is resized by each ratio of ``test_scale`` (keep ratio;
e.g. (2048, 512) for ADE20K, None for the original size) and optionally mirrored; the softmax probabilities,
resized back to the annotation size, are averaged.

Evaluation: each process takes its shard of the data (``EvalShard``), accumulates a confusion matrix on the device
(``arvision.metrics.ConfusionMatrix``), and the matrices are summed over processes before the metrics.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ..data.workers import ignore_stop_signals
from ..files import atomic_write
from ..metrics import ConfusionMatrix
from ..models.segmentation import IGNORE_INDEX
from .sharding import EvalShard, unpack_weighted

MODES = ("whole", "slide")


def _pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of mmseg's windows along one axis: every ``stride``, the last window flush with the border
    (a single window clipped to the image when it is smaller than ``crop``)."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(n)]


def slide_logits(model: Callable, images: torch.Tensor, num_classes: int, crop, stride,
                 batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K, H, W) averaged over windows, count map (1, 1, H, W)). ``model(x)`` gives logits at x's size;
    windows of the same size are run ``batch_size`` images at a time."""
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    if min(ch, cw, sh, sw) < 1:
        raise ValueError(f"crop and stride must be positive, got {crop} and {stride}")
    B, _, H, W = images.shape
    boxes = [(y, x, min(y + ch, H), min(x + cw, W)) for y in window_starts(H, ch, sh) for x in window_starts(W, cw, sw)]
    out = images.new_zeros((B, num_classes, H, W), dtype=torch.float32)
    count = images.new_zeros((1, 1, H, W), dtype=torch.float32)
    per_call = max(1, batch_size // B)
    for i in range(0, len(boxes), per_call):
        chunk = boxes[i:i + per_call]
        logits = model(torch.cat([images[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in chunk])).float()
        for j, (y1, x1, y2, x2) in enumerate(chunk):
            out[:, :, y1:y2, x1:x2] += logits[j * B:(j + 1) * B]
            count[:, :, y1:y2, x1:x2] += 1
    return out / count, count


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear",
                                                                       align_corners=False)


@torch.inference_mode()
def inference(model: nn.Module, images: torch.Tensor, mode: str = "slide", crop=512, stride=341, flip: bool = False,
              ratios: Sequence[float] = (1.0,), test_scale: Optional[Sequence[int]] = None,
              out_size: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
              batch_size: int = 8) -> torch.Tensor:
    """Class probabilities (B, K, *out_size) of normalised ``images`` (B, 3, H, W), averaged over the scales
    ``ratios`` x ``test_scale`` and, with ``flip``, the mirrored images (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"inference mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not ratios or min(ratios) <= 0:
        raise ValueError(f"ratios must be positive scale factors, got {list(ratios)}")
    from ..data.segmentation_transforms import rescale_size

    K = num_classes or model.config.num_classes
    H, W = images.shape[-2:]
    out_size = tuple(out_size or (H, W))
    run = (lambda x: slide_logits(model, x, K, crop, stride, batch_size)[0]) if mode == "slide" else model
    total = None
    for r in ratios:
        size = rescale_size(H, W, [s * r for s in test_scale]) if test_scale else (
            max(1, int(H * r + 0.5)), max(1, int(W * r + 0.5)))
        x = _resize(images, size)
        for mirrored in ((False, True) if flip else (False,)):
            logits = run(x.flip(-1) if mirrored else x).float()
            if mirrored:
                logits = logits.flip(-1)
            probs = _resize(logits, out_size).softmax(1)
            total = probs if total is None else total + probs
    return total / (len(ratios) * (2 if flip else 1))


def evaluate_segmentation(model: nn.Module, dataset: Dataset, num_classes: int, mode: str = "slide", crop=512,
                          stride=341, flip: bool = False, ratios: Sequence[float] = (1.0,),
                          test_scale: Optional[Sequence[int]] = None, device=None,
                          amp_dtype: Optional[torch.dtype] = None, batch_size: int = 1, num_workers: int = 0,
                          ignore_index: int = IGNORE_INDEX, classes: Optional[Sequence[str]] = None,
                          rank: int = 0, world_size: int = 1) -> dict:
    """mIoU / mAcc / aAcc (percent) and per-class IoU / Acc of ``model`` on ``dataset`` ((normalised image, mask)
    pairs at the annotation size). Each process evaluates its shard; the confusion matrices are all-reduced, so every
    process returns the dataset-level metrics. ``batch_size`` > 1 needs images of equal size. Restores the mode."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    loader = DataLoader(EvalShard(dataset, rank, world_size), batch_size=batch_size, num_workers=num_workers,
                        worker_init_fn=ignore_stop_signals)  # a SIGTERM during training's evaluation is the Trainer's
    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    was_training = model.training
    model.eval()
    n = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for batch in loader:
            images, masks, keep = unpack_weighted(batch)
            images, masks = images.to(device), masks.to(device)
            if masks.shape[-2:] != images.shape[-2:]:
                raise ValueError(f"a mask of size {tuple(masks.shape[-2:])} does not match its image of size "
                                 f"{tuple(images.shape[-2:])}; masks must be at their image's size")
            with amp:
                probs = inference(model, images, mode, crop, stride, flip, ratios, test_scale, masks.shape[-2:],
                                  num_classes)
            pred = probs.argmax(1)
            if keep is not None:
                keep = keep.to(device)
                pred, masks = pred[keep], masks[keep]
            cm.update(pred, masks)
            n += pred.shape[0]
    finally:
        model.train(was_training)
    cm.all_reduce()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
    res = cm.compute()
    names = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    pct = lambda v: None if math.isnan(v) else 100.0 * v  # noqa: E731
    return {"mIoU": pct(res["mIoU"]), "mAcc": pct(res["mAcc"]), "aAcc": pct(res["aAcc"]), "n": int(n),
            "IoU": {c: pct(float(v)) for c, v in zip(names, res["IoU"])},
            "Acc": {c: pct(float(v)) for c, v in zip(names, res["Acc"])}}


def colorize(pred: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours (ignore / out-of-range labels black)."""
    lut = np.zeros((256 if len(palette) <= 256 else len(palette) + 1, 3), np.uint8)
    lut[:len(palette)] = np.asarray(palette, np.uint8)
    return lut[np.clip(pred, 0, len(lut) - 1)]


def overlay_image(image: Image.Image, pred: np.ndarray, classes: Sequence[str], palette: Sequence[Sequence[int]],
                  alpha: float = 0.5) -> Image.Image:
    """The image blended with the class colours of ``pred`` (``alpha`` the colour weight), with a legend (swatch and
    name) of the classes present, most frequent first, on the right."""
    colour = Image.fromarray(colorize(pred, palette))
    blend = Image.blend(image.convert("RGB"), colour, alpha)
    ids, counts = np.unique(pred, return_counts=True)
    present = [int(i) for i in ids[np.argsort(-counts)] if 0 <= i < len(classes)]
    font = ImageFont.load_default()
    row = 14
    width = 24 + max([int(ImageDraw.Draw(blend).textlength(classes[i], font=font)) for i in present] or [0])
    W, H = blend.size
    canvas = Image.new("RGB", (W + width + 8, max(H, row * len(present) + 8)), (255, 255, 255))
    canvas.paste(blend, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, i in enumerate(present):
        y = 4 + k * row
        draw.rectangle([W + 6, y, W + 16, y + 10], fill=tuple(int(v) for v in palette[i]), outline=(0, 0, 0))
        draw.text((W + 20, y - 1), classes[i], fill=(0, 0, 0), font=font)
    return canvas


def save_png(image: Image.Image, path: Union[str, os.PathLike]) -> Path:
    with atomic_write(path, suffix=".png") as tmp:
        image.save(tmp)
    return Path(path)
