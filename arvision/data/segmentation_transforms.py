"""Joint image + mask transforms for semantic segmentation (torchvision.transforms.v2), after mmseg's ADE20K pipeline.

The image travels as a `tv_tensors.Image` (uint8 until normalised) and the mask as a `tv_tensors.Mask`, so every
geometric op moves both, the mask is resized with nearest interpolation, and photometric ops and normalisation touch
the image only. A `PairTransform` takes (PIL image / HWC uint8 array / CHW tensor, mask) and returns
(float image (3, H, W), LongTensor mask (H, W)).

    tf = seg_train_transform(crop_size=512, scale=(2048, 512))     # mmseg ADE20K training pipeline
    image, mask = tf(pil_image, pil_mask)                          # (3, 512, 512) float, (512, 512) int64
    image, mask = seg_eval_transform()(pil_image, pil_mask)        # original size, image normalised only

Random draws use torch's RNG, so DataLoader workers get independent streams (torch seeds each worker).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from ..models.segmentation import IGNORE_INDEX
from .images import to_rgb
from .transforms import NEPA_MEAN, NEPA_STD


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(h), int(w)


def _find_mask(flat_inputs: list[Any]) -> tv_tensors.Mask | None:
    return next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= max(scale) and short side <= min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class RandomResizeRatio(v2.Transform):
    """mmseg `Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True)`: draw r ~ U(ratio_range), rescale to
    fit scale * r keeping the aspect ratio; bilinear (antialiased by default) for the image, centre-aligned nearest
    for the mask."""

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0),
                 antialias: bool = True):
        super().__init__()
        if len(scale) != 2 or min(scale) <= 0 or len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"need scale (long, short) > 0 and 0 < ratio_range[0] <= ratio_range[1], "
                             f"got {scale!r} and {ratio_range!r}")
        self.scale, self.ratio_range, self.antialias = tuple(scale), tuple(ratio_range), antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = self.ratio_range
        ratio = lo + float(torch.rand(())) * (hi - lo)
        h, w = query_size(flat_inputs)
        return {"size": list(rescale_size(h, w, [s * ratio for s in self.scale]))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # Masks: NEAREST_EXACT (pixel-centre aligned, like bilinear); plain NEAREST (and OpenCV's, used by mmseg)
        # samples floor(i * scale), shifting the mask by up to half a source pixel against the image.
        mask = isinstance(inpt, tv_tensors.Mask)
        mode = v2.InterpolationMode.NEAREST_EXACT if mask else v2.InterpolationMode.BILINEAR
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=mode, antialias=self.antialias)


class RandomCropCatMax(v2.Transform):
    """mmseg `RandomCrop(crop_size, cat_max_ratio)`: a random crop (clipped to the image when smaller) redrawn up to
    `max_tries` times until no single class covers `cat_max_ratio` or more of the crop's labelled pixels
    (`ignore_index` not counted) and at least two classes are present; after `max_tries` misses the last draw is
    kept, as in mmseg."""

    def __init__(self, size: int | Sequence[int], cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX,
                 max_tries: int = 10):
        super().__init__()
        self.size, self.cat_max_ratio, self.ignore_index = _pair(size), cat_max_ratio, ignore_index
        self.max_tries = max_tries

    def _draw(self, h: int, w: int) -> tuple[int, int]:
        top = int(torch.randint(0, max(h - self.size[0], 0) + 1, ()))
        left = int(torch.randint(0, max(w - self.size[1], 0) + 1, ()))
        return top, left

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        ch, cw = min(h, self.size[0]), min(w, self.size[1])
        top, left = self._draw(h, w)
        mask = _find_mask(flat_inputs)
        if mask is not None and self.cat_max_ratio < 1:
            for _ in range(self.max_tries):
                crop = mask[..., top:top + ch, left:left + cw].reshape(-1)
                counts = torch.bincount(crop[crop != self.ignore_index].long())
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                    break
                top, left = self._draw(h, w)
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class PhotoMetricDistortion(v2.Transform):
    """mmseg `PhotoMetricDistortion` on a uint8 image, each step with probability 1/2, in mmseg's order: brightness
    (add U(-32, 32)), then contrast (multiply by U(0.5, 1.5)) either here or last, saturation (scale HSV saturation
    by U(0.5, 1.5)), hue (shift by randint(-18, 18), high excluded as numpy's, in OpenCV's 180 hue units); every step
    clips and truncates to uint8 as mmseg does. Equal to mmseg up to OpenCV's uint8 rounding of the HSV round trip.
    Masks pass through."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18):
        super().__init__()
        self.brightness_delta, self.hue_delta = brightness_delta, hue_delta
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + float(torch.rand(())) * (hi - lo)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        on = (torch.rand(5) < 0.5).tolist()  # brightness, contrast-first, contrast, saturation, hue
        return {
            "brightness": self._uniform(-self.brightness_delta, self.brightness_delta) if on[0] else None,
            "contrast_first": on[1],
            "contrast": self._uniform(*self.contrast_range) if on[2] else None,
            "saturation": self._uniform(*self.saturation_range) if on[3] else None,
            "hue": int(torch.randint(-self.hue_delta, self.hue_delta, ())) if on[4] else None,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if inpt.dtype != torch.uint8:
            raise ValueError(f"PhotoMetricDistortion expects a uint8 image (apply it before normalising), "
                             f"got {inpt.dtype}")
        img = inpt.as_subclass(torch.Tensor)
        if params["brightness"] is not None:
            img = _to_uint8(img.float() + params["brightness"])
        if params["contrast_first"] and params["contrast"] is not None:
            img = _to_uint8(img.float() * params["contrast"])
        if params["saturation"] is not None:
            img = _scale_saturation(img, params["saturation"])
        if params["hue"] is not None:
            img = F.adjust_hue(img, params["hue"] / 180.0)
        if not params["contrast_first"] and params["contrast"] is not None:
            img = _to_uint8(img.float() * params["contrast"])
        return tv_tensors.wrap(img, like=inpt)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(0, 255).to(torch.uint8)  # clip, then truncate, as numpy's astype(uint8)


def _scale_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply the HSV saturation by `factor` (clipped to 1) keeping hue and value: with V = max(r, g, b) and
    S = (V - min) / V, each channel is c = V - (V - c), and (V - c) scales linearly with S."""
    x = img.float()
    v = x.amax(dim=-3, keepdim=True)
    s = (v - x.amin(dim=-3, keepdim=True)) / v.clamp_min(1e-6)
    gain = torch.minimum(torch.full_like(s, factor), 1.0 / s.clamp_min(1e-6))
    return _to_uint8((v - (v - x) * gain).round_())


class PadTo(v2.Transform):
    """mmseg `Pad(size, pad_val=0, seg_pad_val=255)`: pad bottom and right up to `size`; the image with `fill`, the
    mask with `mask_fill` (the ignore index)."""

    def __init__(self, size: int | Sequence[int], fill: float = 0.0, mask_fill: int = IGNORE_INDEX):
        super().__init__()
        self.size, self.fill, self.mask_fill = _pair(size), fill, mask_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        return {"padding": [0, 0, max(self.size[1] - w, 0), max(self.size[0] - h, 0)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.fill
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


def to_tv_tensors(image: Any, mask: Any) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """(PIL / HWC uint8 array / CHW tensor image, PIL / HW array / HW tensor mask) as (uint8 Image, int64 Mask)."""
    if isinstance(image, Image.Image):
        image = F.pil_to_tensor(to_rgb(image))
    elif isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask)
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).long()
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2 or tuple(mask.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match image of size {tuple(image.shape[-2:])}")
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


class PairTransform:
    """Run a v2 pipeline on (image, mask) and return (image tensor (3, H, W), LongTensor mask (H, W))."""

    def __init__(self, transforms: Sequence[v2.Transform]):
        self.pipeline = v2.Compose(list(transforms))

    def __call__(self, image: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk = self.pipeline(*to_tv_tensors(image, mask))
        return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"PairTransform({self.pipeline!r})"


def seg_train_transform(crop_size: int | Sequence[int] = 512, scale: Sequence[int] = (2048, 512),
                        ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, hflip: float = 0.5,
                        photometric: bool = True, mean: Sequence[float] = NEPA_MEAN, std: Sequence[float] = NEPA_STD,
                        ignore_index: int = IGNORE_INDEX) -> PairTransform:
    """mmseg's ADE20K training pipeline: random resize (ratio_range of `scale`, keep ratio), random crop `crop_size`
    (cat_max_ratio), horizontal flip, photometric distortion, normalise the image (to [-1, 1] with NEPA's mean/std by
    default; pass ImageNet's for other backbones), pad to `crop_size` (image 0, mask `ignore_index`).
    For 32 px data use e.g. crop_size=32, scale=(128, 32)."""
    ops: list[v2.Transform] = [RandomResizeRatio(scale, ratio_range),
                               RandomCropCatMax(crop_size, cat_max_ratio, ignore_index)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if photometric:
        ops.append(PhotoMetricDistortion())
    ops += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(mean, std),
            PadTo(crop_size, 0.0, ignore_index)]
    return PairTransform(ops)


def seg_eval_transform(mean: Sequence[float] = NEPA_MEAN, std: Sequence[float] = NEPA_STD) -> PairTransform:
    """Evaluation: the image normalised, image and mask at their original size (sliding-window inference handles any
    size)."""
    return PairTransform([v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                          v2.Normalize(mean, std)])
