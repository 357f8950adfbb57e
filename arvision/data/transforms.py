"""Image transforms of the official NEPA recipes (spec nepa_spec.md §4, §5.2, §5.5), torchvision v1 / timm."""
from __future__ import annotations

from typing import Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

NEPA_MEAN = (0.5, 0.5, 0.5)
NEPA_STD = (0.5, 0.5, 0.5)


def pretrain_transform(img_size: int, scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                       mean: Sequence[float] = NEPA_MEAN, std: Sequence[float] = NEPA_STD) -> T.Compose:
    """NEPA pretraining: RandomResizedCrop (bilinear, antialias) + horizontal flip; pixels in [-1, 1] by default."""
    ops = [T.RandomResizedCrop(img_size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=InterpolationMode.BILINEAR,
                               antialias=True)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(img_size: int, resize: int | None = None, crop_pct: float | None = None,
                   interpolation: str = "bicubic", mean: Sequence[float] = NEPA_MEAN,
                   std: Sequence[float] = NEPA_STD) -> T.Compose:
    """Resize + CenterCrop(img_size) + normalise.

    `resize` sets the shorter side (aspect kept); default int(img_size / 0.875), i.e. 256 for 224, and img_size itself
    for img_size <= 64 so that CIFAR-sized images stay intact. `crop_pct` reproduces the official fine-tune script:
    Resize((int(img_size / crop_pct),) * 2), a square warp that does not keep the aspect ratio (235 for 224 at 0.95).
    """
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        size: int | tuple[int, int] = (int(img_size / crop_pct),) * 2
    else:
        size = resize if resize is not None else (img_size if img_size <= 64 else int(img_size / 0.875))
    return T.Compose([
        T.Resize(size, interpolation=InterpolationMode(interpolation), antialias=True),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def finetune_transform(img_size: int, auto_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25,
                       interpolation: str = "bicubic", mean: Sequence[float] = NEPA_MEAN,
                       std: Sequence[float] = NEPA_STD, scale: Sequence[float] = (0.08, 1.0)):
    """NEPA fine-tuning (timm): RandomResizedCrop, flip, RandAugment, normalise, RandomErasing (per-pixel noise).

    timm's RandAugment draws from Python's `random`, so seed that too for reproducibility.
    """
    from timm.data import create_transform

    tf = create_transform(input_size=img_size, is_training=True, scale=tuple(scale), auto_augment=auto_augment,
                          interpolation=interpolation, re_prob=re_prob, re_mode="pixel", re_count=1,
                          mean=tuple(mean), std=tuple(std))
    _fix_posterize(tf)
    return tf


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, with 0 bits giving a black image as Pillow < 13 did (Pillow 13 raises for bits < 1);
    RandAugment's "increasing" posterize asks for 0 bits at magnitude 10, which m9 +- 0.5 std reaches often."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(tf) -> None:
    from timm.data.auto_augment import AugmentOp

    for t in tf.transforms:
        for op in getattr(t, "ops", ()):
            if isinstance(op, AugmentOp) and op.name.startswith("Posterize"):
                op.aug_fn = _posterize
