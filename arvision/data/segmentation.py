"""Semantic segmentation datasets yielding (image, mask): ADE20K (`ADEChallengeData2016`), generic image + mask folders
with a class list, and a built-in synthetic set of shapes with exact masks.

Without a transform a sample is (uint8 image (3, H, W), LongTensor mask (H, W)); a transform is called as
`transform(pil_image, mask_array)` (see arvision.data.segmentation_transforms). Labels are 0..num_classes-1, and
`ignore_index` (default 255, `segment.ignore_index`; outside the class range) marks pixels that count for nothing,
in the mask files and in the masks this yields.

    ds = build_segmentation_dataset("/data/ADEChallengeData2016", "train", seg_train_transform())   # 150 classes
    ds = build_segmentation_dataset("synthetic", "val", img_size=64)                               # 11 classes
    image, mask = ds[0]

Layouts:
- ADE20K: `images/{training,validation}/*.jpg`, `annotations/{training,validation}/*.png`; annotation 0 ("other")
  becomes the ignore index and v becomes v - 1 (reduce-zero-label), giving the 150 classes of arvision.data.ade20k.
- Generic folders: `images/<split>/` and `annotations/<split>/` (split `train`/`training`, `val`/`validation`, `test`),
  masks named as their image with a .png suffix, and a class list `classes.json` at the root:
  `[{"name": "road", "color": [128, 64, 128]}, ...]` (or a list of names), or `classes.csv` / `classes.txt` with
  lines `name` or `name,r,g,b`. Masks hold class indices (grey or palette PNG) or, as RGB images, the class colours.
A corrupt image or mask is skipped and counted (`num_skipped`) as in the classification folders; a mask whose size
differs from its image, or labels outside the class list, raise `DataError` naming the file.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..models.segmentation import IGNORE_INDEX, check_ignore_index
from .ade20k import ADE20K_CLASSES, ADE20K_PALETTE
from .datasets import SYNTHETIC, DataError, SkipCorruptDataset
from .images import IMG_EXTENSIONS, is_hidden, list_files, open_rgb
from .synthetic import SHAPES, SPLITS, render_scene

CLASS_FILES = ("classes.json", "classes.csv", "classes.txt")
_SPLIT_DIRS = {"train": ("training", "train"), "val": ("validation", "val"), "test": ("test", "testing")}
_SYNTHETIC_SIZES = {"train": 4000, "val": 500, "test": 500}


def _default_palette(n: int) -> list[tuple[int, int, int]]:
    """Distinct colours (the PASCAL VOC bit-interleaving palette)."""
    out = []
    for i in range(n):
        c, rgb = i + 1, [0, 0, 0]
        for shift in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << shift
            c >>= 3
        out.append(tuple(rgb))
    return out


def _to_sample(image: Image.Image, mask: np.ndarray, transform: Callable | None) -> tuple[Any, Any]:
    if transform is not None:
        return transform(image, mask)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous(), torch.from_numpy(mask)


class SegmentationFolder(SkipCorruptDataset):
    """Image + mask folders: `images/<split>/<name>.<ext>` paired with `annotations/<split>/<name>.png`.

    Pairs are matched by relative path without extension; an image with no mask is an error (masks with no image
    are ignored). `reduce_zero_label`: mask value 0 -> ignore, v -> v - 1 (ADE20K). RGB masks are read through
    `palette` (colour -> class index). Symbolic links among the images are followed (each real file once; see
    arvision.data.images) except into `dataset_root` (the folder holding images/ and annotations/) outside `image_dir`:
    another split's images are never listed.
    """

    def __init__(self, image_dir: str | os.PathLike, mask_dir: str | os.PathLike, classes: Sequence[str],
                 palette: Sequence[Sequence[int]] | None = None, transform: Callable | None = None,
                 reduce_zero_label: bool = False, ignore_index: int = IGNORE_INDEX, mask_suffix: str = ".png",
                 dataset_root: str | os.PathLike | None = None):
        self.image_dir, self.mask_dir, self.transform = Path(image_dir), Path(mask_dir), transform
        self.classes = list(classes)
        self.palette = [tuple(int(v) for v in c) for c in palette] if palette else _default_palette(len(self.classes))
        if len(self.palette) != len(self.classes):
            raise ValueError(f"{len(self.classes)} classes but {len(self.palette)} palette colours")
        if not self.classes or len(self.classes) > 65535:
            raise ValueError(f"need 1..65535 classes, got {len(self.classes)}")
        check_ignore_index(ignore_index, len(self.classes))
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index
        for d, what in ((self.image_dir, "image"), (self.mask_dir, "mask")):
            if not d.is_dir():
                raise FileNotFoundError(f"{what} folder {d} does not exist")
        images = list_files(self.image_dir, IMG_EXTENSIONS, dataset_root)  # no link into another split
        if not images:
            raise FileNotFoundError(f"no images found under {self.image_dir} ({', '.join(IMG_EXTENSIONS)})")
        self.samples: list[tuple[str, str]] = []
        for img in images:
            mask = (self.mask_dir / img.relative_to(self.image_dir)).with_suffix(mask_suffix)
            if not mask.is_file():
                raise FileNotFoundError(f"image {img} has no mask: expected {mask}")
            self.samples.append((str(img), str(mask)))
        self._colour_lut = {c: i for i, c in enumerate(self.palette)}
        self._init_skipping(len(self.samples))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _labels(self, raw: np.ndarray, path: str) -> np.ndarray:
        """Raw mask values -> class indices (int64), ignore_index kept; out-of-range values raise DataError."""
        raw = raw.astype(np.int64)
        if self.reduce_zero_label:
            valid = (raw <= self.num_classes) | (raw == self.ignore_index)
            labels = np.where((raw == 0) | (raw == self.ignore_index), self.ignore_index, raw - 1)
        else:
            valid = (raw < self.num_classes) | (raw == self.ignore_index)
            labels = raw
        if not valid.all():
            bad = np.unique(raw[~valid])
            top = self.num_classes if self.reduce_zero_label else self.num_classes - 1
            shown = ", ".join(map(str, bad[:10].tolist())) + (", ..." if len(bad) > 10 else "")
            raise DataError(f"mask {path} has labels {shown} outside 0..{top} ({self.num_classes} classes"
                            f"{', reduce_zero_label' if self.reduce_zero_label else ''}) and the ignore index "
                            f"{self.ignore_index}; fix the mask or the class list")
        return labels

    def _colours_to_labels(self, rgb: np.ndarray, path: str) -> np.ndarray:
        flat = rgb.reshape(-1, 3).astype(np.int64)
        keys = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
        uniq, inverse = np.unique(keys, return_inverse=True)
        lut = {(r << 16) | (g << 8) | b: i for (r, g, b), i in self._colour_lut.items()}
        missing = [int(k) for k in uniq if int(k) not in lut]
        if missing:
            shown = ", ".join(f"({k >> 16}, {(k >> 8) & 255}, {k & 255})" for k in missing[:5])
            raise DataError(f"mask {path} has colours {shown}{', ...' if len(missing) > 5 else ''} that are not in the "
                            f"class list; add them to the class file or fix the mask")
        return np.asarray([lut[int(k)] for k in uniq], np.int64)[inverse].reshape(rgb.shape[:2])

    def _load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        img_path, mask_path = self.samples[index]
        image = open_rgb(img_path)
        with open(mask_path, "rb") as f:
            mask_img = Image.open(f)
            mask_img.load()
        if mask_img.size != image.size:
            raise DataError(f"mask {mask_path} is {mask_img.size[0]}x{mask_img.size[1]} but its image {img_path} is "
                            f"{image.size[0]}x{image.size[1]} (width x height); masks must match their image")
        if mask_img.mode in ("RGB", "RGBA"):
            return image, self._colours_to_labels(np.asarray(mask_img.convert("RGB")), mask_path)
        raw = np.asarray(mask_img)
        if raw.ndim != 2:
            raise DataError(f"mask {mask_path} has mode {mask_img.mode}; expected a single-channel class-index PNG "
                            f"or an RGB colour mask")
        return image, self._labels(raw, mask_path)

    def _describe(self, index: int) -> str:
        return " / ".join(self.samples[index])

    def _apply_transform(self, sample: tuple[Any, Any]) -> tuple[Any, Any]:
        return _to_sample(*sample, self.transform)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.image_dir)!r}, {len(self)} images, {self.num_classes} classes)")


class ADE20KDataset(SegmentationFolder):
    """ADE20K SceneParsing (`ADEChallengeData2016`): 150 classes, reduce-zero-label (annotation 0 ignored)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 ignore_index: int = IGNORE_INDEX):
        self.root = Path(root)
        name = _split_dir(self.root, split)
        super().__init__(self.root / "images" / name, self.root / "annotations" / name, ADE20K_CLASSES,
                         ADE20K_PALETTE, transform, reduce_zero_label=True, ignore_index=ignore_index,
                         dataset_root=self.root)
        self.split = name


def _split_dir(root: Path, split: str) -> str:
    if split not in _SPLIT_DIRS:
        raise ValueError(f"split must be one of {', '.join(_SPLIT_DIRS)}, got {split!r}")
    for name in _SPLIT_DIRS[split]:
        if (root / "images" / name).is_dir():
            return name
    found = sorted(p.name for p in (root / "images").iterdir() if p.is_dir() and not is_hidden(p.name)) \
        if (root / "images").is_dir() else []
    raise FileNotFoundError(f"no {' or '.join(f'images/{n}' for n in _SPLIT_DIRS[split])} folder in {root} "
                            f"(found: {', '.join(found) or 'no images/ folder'}); a segmentation folder needs "
                            f"images/<split>/ and annotations/<split>/")


def read_class_list(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, int, int]] | None]:
    """(names, colours or None) from classes.json ([{"name", "color"}] or [names]) or a CSV/TXT of `name[,r,g,b]`."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            entries = json.loads(path.read_text())
            if not isinstance(entries, list):
                raise ValueError("expected a JSON list")
            rows = [(e, None) if isinstance(e, str) else (e["name"], e.get("color")) for e in entries]
        else:
            rows = []
            for line in csv.reader(path.read_text().splitlines()):
                if not line or line[0].strip().startswith("#") or line[0].strip().lower() == "name":
                    continue
                rows.append((line[0].strip(), [int(v) for v in line[1:4]] if len(line) >= 4 else None))
        names = [str(n) for n, _ in rows]
        colours = [c for _, c in rows]
        if any(c is not None and (len(c) != 3 or not all(0 <= int(v) <= 255 for v in c)) for c in colours):
            raise ValueError("a colour is not [r, g, b] in 0..255")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read class list {path}: {e}; expected [{{\"name\": ..., \"color\": [r, g, b]}}, "
                         f"...] or lines of name[,r,g,b]") from None
    if not names or len(set(names)) != len(names):
        raise ValueError(f"class list {path} is empty or repeats a name")
    if all(c is None for c in colours):
        return names, None
    if any(c is None for c in colours):
        raise ValueError(f"class list {path} gives colours for some classes only; give all or none")
    return names, [tuple(int(v) for v in c) for c in colours]


def find_class_list(root: str | os.PathLike) -> Path | None:
    return next((Path(root) / n for n in CLASS_FILES if (Path(root) / n).is_file()), None)


def is_ade20k(root: str | os.PathLike) -> bool:
    root = Path(root)
    return (root / "images" / "training").is_dir() and (root / "annotations" / "training").is_dir() \
        and find_class_list(root) is None


class SyntheticSegmentation(Dataset):
    """1 to `max_shapes` shapes of distinct classes per image over a textured background, with exact masks.

    Classes: 0 "background", k + 1 the k-th shape of SyntheticShapes (11 in all). Sample i is a deterministic function
    of (seed, split, i); train, val and test are independent streams.
    """

    classes = ["background", *SHAPES]
    palette = [(0, 0, 0), *_default_palette(len(SHAPES))]

    def __init__(self, num_samples: int = 4000, img_size: int = 32, split: str = "train", seed: int = 0,
                 transform: Callable | None = None, max_shapes: int = 3, ignore_index: int = IGNORE_INDEX):
        check_ignore_index(ignore_index, len(self.classes))  # every pixel is labelled; the padding uses it
        self.ignore_index = ignore_index
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_samples < 1 or img_size < 8 or not 1 <= max_shapes <= len(SHAPES):
            raise ValueError(f"need num_samples >= 1, img_size >= 8 and max_shapes in 1..{len(SHAPES)}, got "
                             f"{num_samples}, {img_size} and {max_shapes}")
        self.num_samples, self.img_size, self.split, self.seed = num_samples, img_size, split, seed
        self.transform, self.max_shapes = transform, max_shapes
        self._stream = (seed, SPLITS.index(split), 2)  # 2: not the SyntheticShapes streams

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def render(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Sample `index` as (PIL image, uint8 mask), before any transform."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng((*self._stream, index))
        labels = rng.permutation(len(SHAPES))[: int(rng.integers(1, self.max_shapes + 1))].tolist()
        return render_scene(rng, labels, self.img_size)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        image, mask = self.render(index)
        return _to_sample(image, mask.astype(np.int64), self.transform)

    def __repr__(self) -> str:
        return f"SyntheticSegmentation(num_samples={self.num_samples}, img_size={self.img_size}, split={self.split!r})"


def build_segmentation_dataset(source: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                               img_size: int = 32, num_samples: int | None = None,
                               reduce_zero_label: bool | None = None, ignore_index: int = IGNORE_INDEX) -> Dataset:
    """'synthetic' (SyntheticSegmentation), an ADEChallengeData2016 folder, or a generic folder with a class list
    (classes.json / .csv / .txt) and images/<split>/ + annotations/<split>/. `reduce_zero_label` applies to generic
    folders (default False); ADE20K always reduces. `ignore_index`: the label of unlabelled pixels (see the module
    docstring); one inside the class range is a one-line error."""
    if str(source) == SYNTHETIC:
        if split not in _SYNTHETIC_SIZES:
            raise ValueError(f"split must be one of {', '.join(_SYNTHETIC_SIZES)}, got {split!r}")
        n = num_samples if num_samples is not None else _SYNTHETIC_SIZES[split]
        return SyntheticSegmentation(n, img_size, split, transform=transform, ignore_index=ignore_index)
    root = Path(source)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"segmentation data path {root} {what}; "
                                f"pass an ADEChallengeData2016 folder, a folder with images/ annotations/ and "
                                f"classes.json, or '{SYNTHETIC}'")
    class_file = find_class_list(root)
    if class_file is None:
        if is_ade20k(root):
            return ADE20KDataset(root, split, transform, ignore_index)
        raise FileNotFoundError(f"no class list in {root}: add one of {', '.join(CLASS_FILES)} (or use the "
                                f"ADEChallengeData2016 layout, images/training and annotations/training)")
    names, colours = read_class_list(class_file)
    name = _split_dir(root, split)
    return SegmentationFolder(root / "images" / name, root / "annotations" / name, names, colours, transform,
                              reduce_zero_label=bool(reduce_zero_label), ignore_index=ignore_index, dataset_root=root)
