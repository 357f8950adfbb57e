"""Image datasets: class-folder trees and Hugging Face `save_to_disk` folders (with corrupt-image skipping), and
`build_dataset`, which picks one from a source string."""
from __future__ import annotations

import functools
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from .images import IMG_EXTENSIONS, class_folders, list_files, open_rgb, to_rgb
from .synthetic import SyntheticDigits, SyntheticShapes

logger = logging.getLogger("arvision.data")

SYNTHETIC = "synthetic"  # SyntheticShapes
SYNTHETIC_DIGITS = "synthetic-digits"  # SyntheticDigits
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_FALLBACK = {"val": "test", "test": "val"}
_HF_MARKERS = ("dataset_dict.json", "state.json")  # DatasetDict folder / single Dataset folder
_SYNTHETIC_SIZES = {"train": 10000, "val": 2000, "test": 2000}


class DataError(ValueError):
    """Data that decodes but is wrong (a mask whose size differs from its image, labels out of range): raised, never
    skipped, because training on it would be silently wrong."""


class SkipCorruptDataset(Dataset):
    """Base for datasets whose samples may fail to decode.

    Subclasses implement `_load(index) -> (PIL image, target)` and `_describe(index)` (the file name for messages);
    `_apply_transform(sample)` applies `transform` (to the image only by default). `_load` raising `DataError`
    propagates; any other failure marks the sample unreadable. A sample that fails to load is replaced by the next
    readable one (index + 1, wrapping) so that batch shapes stay constant. Each bad sample is logged once per process
    and flagged in a shared-memory tensor, so `num_skipped` counts distinct bad samples across DataLoader worker
    processes and epochs.
    """

    transform: Callable | None

    def _init_skipping(self, num_samples: int) -> None:
        self._bad = torch.zeros(num_samples, dtype=torch.bool).share_memory_()
        self._warned: set[int] = set()

    def _load(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        return f"sample {index}"

    def _apply_transform(self, sample: tuple[Any, Any]) -> tuple[Any, Any]:
        img, label = sample
        return (self.transform(img) if self.transform is not None else img), label

    @property
    def num_skipped(self) -> int:
        """Number of distinct samples found unreadable so far (in any worker process)."""
        return int(self._bad.sum())

    def __len__(self) -> int:
        return len(self._bad)

    def __getitem__(self, index: int):
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for step in range(n):
            i = (index + step) % n
            if self._bad[i]:
                continue
            try:
                sample = self._load(i)
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - any decode failure (OSError, SyntaxError, ValueError, ...)
                self._bad[i] = True
                if i not in self._warned:
                    self._warned.add(i)
                    logger.warning("skipping unreadable image %s (%s: %s)", self._describe(i), type(e).__name__, e)
                continue
            return self._apply_transform(sample)
        raise RuntimeError(f"no readable image in {self!r}: all {n} samples failed to load")


class ImageFolderDataset(SkipCorruptDataset):
    """`root/<class>/<image>` tree; class names sorted to indices, extensions as torchvision's IMG_EXTENSIONS, in
    torchvision's order. Unlike torchvision's ImageFolder: hidden names (`.ipynb_checkpoints`) are neither classes
    nor images, symbolic links are followed but each real file is listed once, loops are not walked and links into
    `dataset_root` (the folder holding `root` and the other splits) outside `root` are skipped (see
    arvision.data.images), every mode reads as 8-bit RGB by its value range, and an empty class folder is a warning
    (it stays a class, so that the indices match the other splits')."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 dataset_root: str | os.PathLike | None = None):
        self.root, self.transform = Path(root), transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"data path {self.root} does not exist or is not a folder")
        self.classes = class_folders(self.root, dataset_root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for path in list_files(self.root, IMG_EXTENSIONS, dataset_root) if self.classes else []:
            parts = path.relative_to(self.root).parts
            if len(parts) > 1 and parts[0] in self.class_to_idx:  # not a file beside the class folders
                self.samples.append((str(path), self.class_to_idx[parts[0]]))
        if not self.samples:
            raise FileNotFoundError(f"no images found under {self.root}: expected class subfolders holding image files "
                                    f"({', '.join(IMG_EXTENSIONS)})")
        self.targets = [label for _, label in self.samples]
        empty = sorted(set(self.classes) - {self.classes[t] for t in set(self.targets)})
        if empty:
            logger.warning("class folder%s %s under %s hold%s no images (kept as classes, with no samples)",
                           "s" if len(empty) > 1 else "", ", ".join(empty), self.root, "" if len(empty) > 1 else "s")
        self._init_skipping(len(self.samples))

    def _load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return open_rgb(path), label

    def _describe(self, index: int) -> str:
        return self.samples[index][0]

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes)"


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading Hugging Face save_to_disk folders needs the `datasets` package; "
                          "install with: pip install 'arvision[hf]'") from e
    return datasets


HF_HUB = "hf://"


def is_hf_hub(source: str | os.PathLike) -> bool:
    return str(source).startswith(HF_HUB)


@functools.lru_cache(maxsize=4)
def _hub_dataset(spec: str) -> dict[str, Any]:
    """``hf://owner/name[:config][@revision]`` through ``datasets.load_dataset``: downloaded once into the Hugging
    Face cache and read as memory-mapped Arrow, a map-style dataset, so the sampler's exact resume holds (a streamed
    IterableDataset would not give it). Any name ``load_dataset`` takes works, a local data folder included."""
    name, _, revision = spec[len(HF_HUB):].partition("@")
    name, _, config = name.partition(":")
    if not name:
        raise ValueError(f"{spec!r} names no dataset; use hf://owner/name[:config][@revision]")
    try:
        ds = _import_datasets().load_dataset(name, config or None, revision=revision or None)
    except (FileNotFoundError, ConnectionError) as e:
        raise FileNotFoundError(f"Hugging Face dataset {spec} could not be loaded ({str(e).splitlines()[0]}); check "
                                "the name, or download it where the Hub is reachable and pass its folder") from None
    return dict(ds) if hasattr(ds, "keys") else {"train": ds}


def _hf_load(path: str | os.PathLike) -> dict[str, Any]:
    """{split name: datasets.Dataset} of a `save_to_disk` folder (a single Dataset is the 'train' split) or of a
    Hub dataset ``hf://owner/name``."""
    if is_hf_hub(path):
        return _hub_dataset(str(path))
    ds = _import_datasets().load_from_disk(str(path))
    return dict(ds) if hasattr(ds, "keys") else {"train": ds}


def _to_pil(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict):  # an undecoded datasets.Image cell: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = io.BytesIO(value)
    if value is None:
        raise ValueError("empty image cell")
    return open_rgb(value)


class HFDiskDataset(SkipCorruptDataset):
    """A Hugging Face dataset written with `save_to_disk` (a DatasetDict folder, or a single Dataset folder).

    The image column is the one with an `Image` feature (else 'image' / 'img'); the label column the one with a
    `ClassLabel` feature (else 'label' / 'labels'). Without a label column every label is -1 (pretraining only).
    """

    def __init__(self, path: str | os.PathLike, split: str, transform: Callable | None = None,
                 image_key: str | None = None, label_key: str | None = None):
        datasets = _import_datasets()
        self.path, self.split, self.transform = (path if is_hf_hub(path) else Path(path)), split, transform
        splits = _hf_load(path)
        if split not in splits:
            raise ValueError(f"split {split!r} not found in {path}; available splits: {', '.join(splits)}")
        ds = splits[split]
        features = ds.features
        self.image_key = image_key or _find_column(features, datasets.Image, ("image", "img"))
        self.label_key = label_key or _find_column(features, datasets.ClassLabel, ("label", "labels"))
        if self.image_key is None or self.image_key not in features:
            raise ValueError(f"no image column in {path} (columns: {', '.join(features)}); pass image_key=")
        if self.label_key is not None and self.label_key not in features:
            raise ValueError(f"no column {self.label_key!r} in {path} (columns: {', '.join(features)})")
        if isinstance(features[self.image_key], datasets.Image):
            ds = ds.cast_column(self.image_key, datasets.Image(decode=False))  # decode ourselves, to catch errors
        self._ds = ds.select_columns([k for k in (self.image_key, self.label_key) if k is not None])
        if self.label_key is None:
            self.targets, self.classes = [-1] * len(ds), []
        else:
            self.targets = [int(t) for t in ds.data.column(self.label_key).to_pylist()]
            feature = features[self.label_key]
            self.classes = (list(feature.names) if isinstance(feature, datasets.ClassLabel)
                            else [str(c) for c in range(max(self.targets) + 1)])
        self._init_skipping(len(self._ds))

    def _load(self, index: int) -> tuple[Image.Image, int]:
        return _to_pil(self._ds[index][self.image_key]), self.targets[index]

    def _describe(self, index: int) -> str:
        cell = self._ds[index][self.image_key]
        name = cell.get("path") if isinstance(cell, dict) else None
        return f"{self.path} [{self.split}] row {index}" + (f" ({name})" if name else "")

    def __repr__(self) -> str:
        return f"HFDiskDataset({str(self.path)!r}, split={self.split!r}, {len(self)} images)"


def _find_column(features: dict, feature_type: type, names: tuple[str, ...]) -> str | None:
    typed = [k for k, f in features.items() if isinstance(f, feature_type)]
    return typed[0] if typed else next((n for n in names if n in features), None)


def is_synthetic(source: str | os.PathLike) -> bool:
    return str(source) in (SYNTHETIC, SYNTHETIC_DIGITS)


def is_hf_disk(source: str | os.PathLike) -> bool:
    return any((Path(source) / marker).is_file() for marker in _HF_MARKERS)


def _check_exists(source: str | os.PathLike) -> Path:
    path = Path(source)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"data path {path} {what}; pass a folder with train/ (and val/ or test/) class "
                                f"subfolders, an HF save_to_disk folder, WebDataset shards (their folder or a pattern "
                                f"'shards/train-{{000000..000009}}.tar'), a Hub dataset 'hf://owner/name', or '{SYNTHETIC}' / "
                                f"'{SYNTHETIC_DIGITS}'")
    return path


def available_splits(source: str | os.PathLike) -> list[str]:
    """The split names a source offers (as named on disk)."""
    if is_synthetic(source):
        return list(_SPLIT_ALIASES)
    from .shards import is_shard_source, shard_splits  # shards.py builds on this module's SkipCorruptDataset

    if is_shard_source(source):
        return shard_splits(source)
    if is_hf_hub(source):
        return list(_hf_load(source))
    path = _check_exists(source)
    if (path / "dataset_dict.json").is_file():
        return list(json.loads((path / "dataset_dict.json").read_text())["splits"])
    if is_hf_disk(path):
        return ["train"]  # a single Dataset folder
    return sorted(p.name for p in path.iterdir()
                  if p.is_dir() and any(p.name in names for names in _SPLIT_ALIASES.values()))


def resolve_split(source: str | os.PathLike, split: str) -> str:
    """The split actually used for `split`: itself or an alias ('val' <-> 'validation'), else 'val' <-> 'test'."""
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"split must be one of {', '.join(_SPLIT_ALIASES)}, got {split!r}")
    splits = available_splits(source)
    for wanted in (split, _FALLBACK.get(split)):
        for name in _SPLIT_ALIASES.get(wanted, ()):
            if name in splits:
                return name
    found = ", ".join(splits) if splits else "none"
    raise ValueError(f"split {split!r} not found in {source} (splits found: {found}); a folder source needs "
                     f"train/ and val/ or test/ subfolders of class folders")


def build_dataset(source: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                  img_size: int = 32, num_samples: int | None = None) -> Dataset:
    """'synthetic' (SyntheticShapes), 'synthetic-digits' (SyntheticDigits), a folder with train/ val/ test/ class-folder subfolders, an HF save_to_disk
    folder, or WebDataset shards (a folder of them or a brace pattern, see arvision.data.shards). A missing 'val'
    falls back to 'test' and vice versa (see `resolve_split`)."""
    from .shards import is_shard_source, open_shards

    name = resolve_split(source, split)
    if is_synthetic(source):
        n = num_samples if num_samples is not None else _SYNTHETIC_SIZES[name]
        cls = SyntheticDigits if str(source) == SYNTHETIC_DIGITS else SyntheticShapes
        return cls(num_samples=n, img_size=img_size, split=name, transform=transform)
    if is_shard_source(source):
        return open_shards(source, name, transform=transform)
    if is_hf_hub(source) or is_hf_disk(source):
        return HFDiskDataset(source, name, transform=transform)
    if (Path(source) / name).is_dir():
        check_split_classes(source, name, class_folders(Path(source) / name, source))
    return ImageFolderDataset(Path(source) / name, transform=transform, dataset_root=source)


def check_split_classes(source: str | os.PathLike, split: str, classes: list[str]) -> None:
    """Raise (one line, naming the classes that differ) when another split folder of ``source`` has other class
    folders than ``classes`` (those of ``split``): labels are indices into the sorted class list, so the same index
    would name different classes in the two splits. A split folder without class folders (flat, unlabelled test
    images) is not compared."""
    for other in available_splits(source):
        others = class_folders(Path(source) / other, source) if other != split else classes
        if others and others != classes:
            mine, theirs = sorted(set(classes) - set(others)), sorted(set(others) - set(classes))
            only = "; ".join(f"only in {s}/: {', '.join(names)}" for s, names in ((split, mine), (other, theirs))
                             if names)
            raise ValueError(f"the class folders of {split}/ and {other}/ in {source} differ ({only}); every split "
                             f"needs the same class folders (an empty one is fine), or labels name different classes")


def fixed_subset_indices(total: int, n: int, seed: int = 0) -> list[int]:
    """n of range(total) drawn at random with a fixed seed, in dataset order: the same subset for every model and
    run, and not the first n (a class-sorted folder's first n images are one or two classes)."""
    return sorted(torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def fixed_subset(dataset, n, seed: int = 0):
    """``dataset`` itself when n is None or >= its length, else a fixed random ``Subset`` (fixed_subset_indices)."""
    if n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, fixed_subset_indices(len(dataset), n, seed))


def labelled_subset(dataset, fraction: float | None, seed: int = 0):
    """A fixed class-balanced fraction of ``dataset`` (the semi-supervised 1% / 10% label splits): in every class,
    the first round(fraction * n_class) images (at least one) of a permutation fixed by ``seed``, in dataset order.
    The same images for every model and training seed. ``dataset`` itself for None or 1."""
    if fraction is None or fraction == 1:
        return dataset
    if not 0 < fraction < 1:
        raise ValueError(f"data.label_fraction must be in (0, 1] (e.g. 0.01 or 0.1), got {fraction}")
    targets = torch.as_tensor(getattr(dataset, "targets", []))
    if targets.numel() != len(dataset) or (targets < 0).any():
        raise ValueError(f"{type(dataset).__name__} has no class labels (targets) to take a class-balanced "
                         "fraction of; drop data.label_fraction")
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    keep = []
    for c in targets.unique().tolist():
        members = order[targets[order] == c]
        keep += members[:max(1, round(fraction * len(members)))].tolist()
    subset = Subset(dataset, sorted(keep))
    subset.classes = getattr(dataset, "classes", [])
    subset.targets = targets[sorted(keep)].tolist()
    return subset
