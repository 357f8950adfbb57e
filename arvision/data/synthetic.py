"""Procedurally generated images (no download, nothing on disk): SyntheticShapes, a labelled shape-classification
dataset; SyntheticDigits, the digits 0-9 drawn in Pillow's built-in font like street-number crops; and
`render_scene`, several shapes with their exact segmentation mask (used by
arvision.data.segmentation.SyntheticSegmentation)."""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SPLITS = ("train", "val", "test")
_SUPERSAMPLE = 2  # render at 2x and box-downsample: anti-aliased edges


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)[:, None]
    return radius * _regular(2 * points, np.pi / 2)


_W = 0.3  # half-width of the cross arms
_CROSS = np.array([(_W, 1), (_W, _W), (1, _W), (1, -_W), (_W, -_W), (_W, -1), (-_W, -1), (-_W, -_W), (-1, -_W),
                   (-1, _W), (-_W, _W), (-_W, 1)], dtype=float)

# name -> (outline, hole or None), unit radius, centred at the origin. Elongated shapes (ellipse, diamond, bar) keep
# their aspect ratio so that no class equals another one rotated.
SHAPES: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
    "circle": (_regular(40), None),
    "square": (_regular(4, np.pi / 4), None),
    "triangle": (_regular(3, np.pi / 2), None),
    "cross": (_CROSS, None),
    "star": (_star(), None),
    "ring": (_regular(40), 0.55 * _regular(40)),
    "ellipse": (_regular(40) * [1.0, 0.5], None),
    "diamond": (np.array([(1, 0), (0, 0.55), (-1, 0), (0, -0.55)], dtype=float), None),
    "hexagon": (_regular(6), None),
    "bar": (np.array([(1, 0.22), (-1, 0.22), (-1, -0.22), (1, -0.22)], dtype=float), None),
}


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return yy, xx


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray]:
    """A random textured RGB background of size x size and the colours it is made of, (k, 3) in [0, 255]."""
    colours = rng.uniform(0, 255, (2, 3))
    kind = rng.integers(4)
    if kind == 2:  # smooth colour noise: a coarse random grid upsampled bicubically
        k = int(rng.integers(2, 7))
        grid = rng.uniform(0, 255, (k, k, 3)).astype(np.uint8)
        return Image.fromarray(grid, "RGB").resize((size, size), Image.BICUBIC), grid.reshape(-1, 3).astype(np.float32)
    yy, xx = _grid(size)
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    if kind == 0:  # linear gradient
        t = (u - u.min()) / (u.max() - u.min())
    else:  # 1: stripes, 3: checkerboard, with a random period and orientation
        period = rng.uniform(0.08, 0.3)
        t = np.floor(u / period)
        if kind == 3:
            t = t + np.floor((yy * np.cos(theta) - xx * np.sin(theta)) / period)
        t = t % 2
    bg = colours[0] + t[..., None] * (colours[1] - colours[0])
    return Image.fromarray(bg.astype(np.uint8), "RGB"), colours.astype(np.float32)


def _pick_colour(rng: np.random.Generator, avoid: np.ndarray) -> tuple[int, ...]:
    """The candidate colour farthest from every colour in `avoid` (k, 3), so the shape stays visible."""
    candidates = rng.uniform(0, 255, (8, 3))
    dist = np.linalg.norm(candidates[:, None] - avoid[None], axis=-1).min(1)
    return tuple(int(c) for c in candidates[dist.argmax()])


def _shape_mask(rng: np.random.Generator, label: int, size: int, radius_range: tuple[float, float]) -> Image.Image:
    """An "L" mask (255 inside) of shape class `label` at a random radius (fraction of `size`), position, rotation."""
    radius = rng.uniform(*radius_range) * size
    centre = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    outline, hole = SHAPES[list(SHAPES)[label]]
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for points, fill in ((outline, 255), (hole, 0)):
        if points is not None:
            xy = points @ rot.T * radius + centre
            draw.polygon([tuple(p) for p in xy.tolist()], fill=fill)
    return mask


def _finish(rng: np.random.Generator, canvas: Image.Image) -> Image.Image:
    """Box-downsample the supersampled canvas (anti-aliased edges) and add Gaussian pixel noise of random strength."""
    img = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32)
    img = img + rng.normal(0, rng.uniform(0, 12), img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def render_shape(rng: np.random.Generator, label: int, img_size: int) -> Image.Image:
    """Draw shape class `label` at a random position, size, rotation and colour over a random background."""
    size = img_size * _SUPERSAMPLE
    bg, bg_colours = _background(rng, size)
    fg = _pick_colour(rng, bg_colours)
    mask = _shape_mask(rng, label, size, (0.15, 0.42))  # the shape spans 30%..84% of the image side
    return _finish(rng, Image.composite(Image.new("RGB", bg.size, fg), bg, mask))


def render_scene(rng: np.random.Generator, labels: list[int], img_size: int,
                 radius_range: tuple[float, float] = (0.12, 0.3)) -> tuple[Image.Image, np.ndarray]:
    """Draw the shape classes `labels` in order (later ones on top) over a random background.

    Returns the image and its segmentation mask, (img_size, img_size) uint8: 0 background, k + 1 shape class k. The
    mask is exact for the rendering: each pixel gets the label covering most of its supersampled area (ties go to
    the shape drawn last), which is also the colour that dominates the pixel's anti-aliased value.
    """
    size = img_size * _SUPERSAMPLE
    canvas, used = _background(rng, size)
    labels_ss = np.zeros((size, size), np.uint8)
    for label in labels:
        fg = _pick_colour(rng, used)
        used = np.concatenate([used, np.asarray([fg], np.float32)])
        mask = _shape_mask(rng, label, size, radius_range)
        canvas = Image.composite(Image.new("RGB", canvas.size, fg), canvas, mask)
        labels_ss[np.asarray(mask) > 127] = label + 1
    order = [label + 1 for label in reversed(labels)] + [0]  # argmax takes the first of tied counts
    counts = np.stack([(labels_ss == c).reshape(img_size, _SUPERSAMPLE, img_size, _SUPERSAMPLE).sum((1, 3))
                       for c in order])
    seg = np.asarray(order, np.uint8)[counts.argmax(0)]
    return _finish(rng, canvas), seg


class SyntheticShapes(torch.utils.data.Dataset):
    """Ten shape classes on textured backgrounds; the label is the shape kind (not its colour or texture).

    Sample i is a deterministic function of (seed, split, i); train, val and test are independent streams.
    Labels are exactly balanced within every block of 10 consecutive indices.
    """

    classes = list(SHAPES)

    def __init__(self, num_samples: int = 10000, img_size: int = 32, split: str = "train", seed: int = 0,
                 transform: Callable | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_samples < 1 or img_size < 8:
            raise ValueError(f"need num_samples >= 1 and img_size >= 8, got {num_samples} and {img_size}")
        self.num_samples, self.img_size, self.split, self.seed = num_samples, img_size, split, seed
        self.transform = transform
        self._stream = (seed, SPLITS.index(split))
        n_classes = len(self.classes)
        blocks = [np.random.default_rng((*self._stream, 1, b)).permutation(n_classes)
                  for b in range(-(-num_samples // n_classes))]
        self.targets: list[int] = np.concatenate(blocks)[:num_samples].tolist()

    def __len__(self) -> int:
        return self.num_samples

    render = staticmethod(render_shape)  # (rng, label, img_size) -> PIL image
    _render_stream = 0  # a per-class tag in the image seeds, so that subclasses draw independent images

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        label = self.targets[index]
        img = self.render(np.random.default_rng((*self._stream, self._render_stream, index)), label, self.img_size)
        return (self.transform(img) if self.transform is not None else img), label

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_samples={self.num_samples}, img_size={self.img_size}, "
                f"split={self.split!r})")


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow >= 10.1 embeds the Aileron Regular typeface (public domain, CC0) for load_default(size)
    return ImageFont.load_default(size=size)


def render_digit(rng: np.random.Generator, label: int, img_size: int) -> Image.Image:
    """The digit `label`, light grey on dark grey like MNIST, at a random size (60-90% of the side), stroke weight,
    rotation (+-15 deg) and offset (+-10%), with Gaussian pixel noise; anti-aliased by supersampling. (Random colours
    and larger jitter made every probe of a 3-minute run chance-level: measured, docs/experiments.md.)"""
    size = img_size * _SUPERSAMPLE
    glyph = Image.new("L", (size, size), 0)
    weight = int(rng.integers(0, 2 * _SUPERSAMPLE))
    ImageDraw.Draw(glyph).text((size / 2, size / 2), str(label), font=_font(int(rng.uniform(0.6, 0.9) * size)),
                               fill=255, anchor="mm", stroke_width=weight, stroke_fill=255)
    glyph = glyph.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR,
                         translate=tuple(rng.uniform(-0.1, 0.1, 2) * size))
    bg, fg = rng.uniform(0, 60), rng.uniform(190, 255)
    img = bg + (fg - bg) * np.asarray(glyph.reduce(_SUPERSAMPLE), dtype=np.float32)[..., None] / 255
    img = np.repeat(img, 3, axis=2) + rng.normal(0, rng.uniform(0, 8), (img_size, img_size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


class SyntheticDigits(SyntheticShapes):
    """The digits 0-9, light on dark, at random sizes, weights, rotations and positions (MNIST-like, in a typeface): the
    label is a spatial arrangement of strokes, not a colour or texture statistic. Same indexing and splits as SyntheticShapes."""

    classes = [str(d) for d in range(10)]
    render = staticmethod(render_digit)
    _render_stream = 2
