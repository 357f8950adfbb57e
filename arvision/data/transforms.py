"""Image transforms of the official NEPA recipes (spec nepa_spec.md §4, §5.2, §5.5), torchvision v1 / timm.

Pretraining can move normalisation to the device: ``pretrain_transform(..., uint8=True)`` yields the cropped and
flipped pixels as uint8 tensors (4x fewer bytes through the loader workers, pinned memory and the host-to-device
copy than float32), and ``normalize_uint8`` turns a batch of them into exactly what ToTensor + Normalize give, on
the batch's device (``NepaObjective`` does it for uint8 inputs):

    tf = pretrain_transform(32, uint8=True)          # PIL -> (3, 32, 32) uint8
    x = normalize_uint8(batch.to("cuda", non_blocking=True))   # float32 in [-1, 1]

Generation (tokenizers, the token cache, FID reference batches) uses ADM's centre crop, ``center_crop_arr``, and
``generation_transform`` keeps its pixels uint8 without normalisation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .images import to_rgb

NEPA_MEAN = (0.5, 0.5, 0.5)
NEPA_STD = (0.5, 0.5, 0.5)


def pretrain_transform(img_size: int, scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                       mean: Sequence[float] = NEPA_MEAN, std: Sequence[float] = NEPA_STD,
                       uint8: bool = False) -> T.Compose:
    """NEPA pretraining: RandomResizedCrop (bilinear, antialias) + horizontal flip; pixels in [-1, 1] by default.
    ``uint8``: the same crop as (3, H, W) uint8 (mean and std unused), to be normalised on the device with
    ``normalize_uint8``; the random draws are the same, so both outputs agree image for image."""
    ops = [T.RandomResizedCrop(img_size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=InterpolationMode.BILINEAR,
                               antialias=True)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if uint8:
        return T.Compose(ops + [T.PILToTensor()])
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def normalize_uint8(images: torch.Tensor, mean: Sequence[float] = NEPA_MEAN,
                    std: Sequence[float] = NEPA_STD) -> torch.Tensor:
    """uint8 images (..., C, H, W) -> float32 (x / 255 - mean) / std on their device: the operations of ToTensor +
    Normalize in the same order, so the result equals the float transform's (bitwise on the CPU)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize_uint8 expects uint8 images, got {images.dtype}; float images are normalised "
                         "already")
    x = images.to(torch.float32).div_(255)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


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


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM / LlamaGen / MAR centre crop: halve with a box filter while the shorter side is >= 2 * image_size, resize
    the shorter side to image_size (bicubic), then crop the centre square."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    factor = image_size / min(image.size)
    image = image.resize(tuple(round(x * factor) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


class GenerationTransform:
    """PIL image -> uint8 (3, img_size, img_size) tensor, not normalised, for tokenizers and the token cache:
    `center_crop_arr`, then a horizontal mirror when `flip` (the cache's flip copies), or with probability
    `random_flip`."""

    def __init__(self, img_size: int, flip: bool = False, random_flip: float = 0.0):
        if img_size < 1 or not 0 <= random_flip <= 1:
            raise ValueError(f"need img_size >= 1 and random_flip in [0, 1], got {img_size} and {random_flip}")
        self.img_size, self.flip, self.random_flip = img_size, flip, random_flip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        arr = torch.from_numpy(np.array(center_crop_arr(to_rgb(image), self.img_size))).permute(2, 0, 1)
        if self.flip ^ (self.random_flip > 0 and bool(torch.rand(()) < self.random_flip)):
            arr = arr.flip(-1)
        return arr.contiguous()

    def __repr__(self) -> str:
        return f"GenerationTransform(img_size={self.img_size}, flip={self.flip}, random_flip={self.random_flip})"


def generation_transform(img_size: int, flip: bool = False, random_flip: float = 0.0) -> GenerationTransform:
    """uint8 images without normalisation (see `GenerationTransform`); to [-1, 1] later with x.float() / 127.5 - 1."""
    return GenerationTransform(img_size, flip, random_flip)


def unit_range_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (..., C, H, W) -> uint8 on the CPU, clamped and rounded (the inverse of x / 127.5 - 1)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
