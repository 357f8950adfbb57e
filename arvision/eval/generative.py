"""Generative-model evaluation: FID / sFID / IS / precision-recall of samples against a reference.

    arvision eval fid samples/ /path/to/cifar10 --extractor fid-helper --num-ref 10000 --out fid.json
    arvision eval fid samples.npz VIRTUAL_imagenet256_labeled.npz --extractor inception     # ADM protocol
    torchrun --nproc_per_node 8 -m arvision eval fid samples.npz ref_stats.npz              # sharded extraction

    from arvision.eval.generative import evaluate_generative
    res = evaluate_generative("samples/", "ref_stats.npz", extractor="fid-helper")   # {"FID": ..., "sFID": ...}

SAMPLES: a folder of images (searched recursively, torchvision's image extensions; names starting with "." skipped,
links followed, each real file once: see arvision.data.images), an ADM-format .npz (``arr_0``: uint8 N x H x W x 3),
or a dataset with split subfolders (``--split``). REF: the same kinds, or a statistics .npz (``mu``, ``sigma`` and
optionally ``mu_s``, ``sigma_s``: arvision's ``--save-ref-stats`` output, MAR's ``adm_in256_stats.npz``, or ADM's
reference batch, whose ``arr_0`` images are then used only for precision / recall, as ADM's evaluator does).
A statistics file written with ``--save-ref-features`` also holds the reference's pool features (``pool``), from which
KID and precision / recall are computed without the images (``--num-ref``: a fixed random subset of them; FID and
sFID use the file's statistics of every reference image). Statistics files without an ``extractor`` tag (ADM's, MAR's) are taken as TF Inception statistics and refused for any
other feature space. ``--num-samples`` / ``--num-ref`` take a fixed random subset (seed 0); FID is biased at small
counts, so compare numbers only at equal counts against the same reference.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.datasets import fixed_subset, fixed_subset_indices
from ..data.images import IMG_EXTENSIONS, list_files, open_rgb, to_rgb
from ..data.transforms import center_crop_arr
from ..files import atomic_write, read_json, write_json
from ..metrics import (feature_statistics, frechet_distance, inception_score, load_npz, precision_recall,
                       sample_accuracy, save_stats)
from ..metrics.extractors import FeatureExtractor, build_extractor
from ..metrics.frechet import REF_FEATURES_KEY, stats_extractor_tag
from ..metrics.kid import KID_SUBSET_SIZE, kernel_inception_distance, kid_subset_size
from ..train.logging import progress_bar

IS_SPLITS = 10

PathLike = Union[str, os.PathLike]


def _to_chw(arr: np.ndarray, size: Optional[int]) -> torch.Tensor:
    if size is not None and arr.shape[:2] != (size, size):
        arr = np.asarray(center_crop_arr(Image.fromarray(np.asarray(arr)), size))  # ADM's reference-batch crop
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy (PIL / memmap)


class ImageFiles(Dataset):
    """Every image under a folder (recursively, sorted; arvision.data.images.list_files), as uint8 (3, H, W)
    tensors in 8-bit RGB (open_rgb)."""

    def __init__(self, root: PathLike, image_size: Optional[int] = None):
        self.root, self.image_size = Path(root), image_size
        self.files = list_files(self.root, IMG_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _to_chw(np.asarray(open_rgb(self.files[i])), self.image_size)


def load_image_arrays(path: PathLike) -> dict:
    """The arrays of an .npz, or ``{"arr_0": array}`` of an .npy (memory-mapped; no pickles), with the image array
    under ``arr_0``: ADM's ``arr_0`` when there is one, else the first array of any name holding uint8 images
    (N x H x W x 3 or N x 3 x H x W)."""
    path = Path(path)
    if path.suffix == ".npy":
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; give an .npy or .npz of uint8 images, or a folder")
        try:
            arrays = {"arr_0": np.load(path, mmap_mode="r", allow_pickle=False)}
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path} is not a readable .npy array ({str(e).splitlines()[0]}); give uint8 "
                             "N x H x W x 3 images") from None
        return arrays
    arrays = dict(load_npz(path))
    if "arr_0" not in arrays:
        found = next((k for k, a in arrays.items() if _image_layout(a) is not None), None)
        if found is not None:
            arrays["arr_0"] = arrays[found]
    return arrays


def _image_layout(arr) -> Optional[str]:
    """'nhwc' or 'nchw' for a uint8 image batch, else None."""
    if getattr(arr, "dtype", None) != np.uint8 or getattr(arr, "ndim", 0) != 4:
        return None
    return "nhwc" if arr.shape[-1] == 3 else "nchw" if arr.shape[1] == 3 else None


class NpzImages(Dataset):
    """The images of an .npz (ADM's ``arr_0``, or the image array under any name) or an .npy: uint8 N x H x W x 3
    (or N x 3 x H x W), memory-mapped when stored uncompressed."""

    def __init__(self, path: PathLike, image_size: Optional[int] = None, arrays: Optional[dict] = None):
        arrays = arrays if arrays is not None else load_image_arrays(path)
        if "arr_0" not in arrays:
            shapes = ", ".join(f"{k} {getattr(a, 'dtype', '?')} {getattr(a, 'shape', '')}" for k, a in arrays.items())
            raise ValueError(f"{path} holds no uint8 image array (arrays: {shapes or 'none'}); samples must be uint8 "
                             "N x H x W x 3 images (ADM's arr_0, or any key)")
        self.arr, self.image_size = arrays["arr_0"], image_size
        self.layout = _image_layout(self.arr)
        if self.layout is None:
            raise ValueError(f"{path}: the images must be uint8 N x H x W x 3 (or N x 3 x H x W), got "
                             f"{self.arr.dtype} {self.arr.shape}")

    def __len__(self) -> int:
        return len(self.arr)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.arr[i] if self.layout == "nhwc" else np.transpose(self.arr[i], (1, 2, 0))
        return _to_chw(image, self.image_size)


class _DatasetImages(Dataset):
    """An arvision dataset split (image-folder tree, HF save_to_disk, synthetic), images only, as uint8 tensors."""

    def __init__(self, source: PathLike, split: str, image_size: Optional[int]):
        from ..data import build_dataset

        self.ds = build_dataset(source, split, transform=lambda im: _to_chw(np.asarray(to_rgb(im)), image_size))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ds[i][0]


def open_images(source: PathLike, split: str = "train", image_size: Optional[int] = None) -> Dataset:
    """Images of an .npz (arr_0), a dataset with split subfolders (that split), or any folder (recursive)."""
    from ..data import available_splits, is_hf_disk, is_synthetic

    if is_synthetic(source):
        return _DatasetImages(source, split, image_size or 32)
    path = Path(source)
    if path.suffix in (".npz", ".npy"):
        return NpzImages(path, image_size)
    if path.is_file():
        raise ValueError(f"{path} is a file but not an .npz or .npy; give an image folder, a dataset folder or an "
                         "array of uint8 N x H x W x 3 images (.npy, or .npz: ADM's arr_0 or any key)")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; give an image folder, a dataset folder or an .npz")
    if is_hf_disk(path) or available_splits(path):
        return _DatasetImages(path, split, image_size)
    return ImageFiles(path, image_size)


def subset(ds: Dataset, n: Optional[int], seed: int = 0) -> Dataset:
    """A fixed random subset of n items (sorted indices), or ds itself when n is None or >= len(ds)."""
    if n is None or n >= len(ds):
        return ds
    if n < 2:
        raise ValueError(f"need at least 2 images for statistics, got --num-samples/--num-ref {n}")
    return fixed_subset(ds, n, seed)


def collate_images(batch: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(x.shape) for x in batch}
    if len(shapes) > 1:
        raise ValueError(f"images differ in size ({sorted(shapes)[:3]}); pass --image-size N to resize and "
                         "centre-crop them (ADM's preprocessing)")
    return torch.stack(batch)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def extract_features(ds: Dataset, extractor: FeatureExtractor, batch_size: int = 50, num_workers: int = 2,
                     amp_dtype: Optional[torch.dtype] = None, progress: bool = True,
                     desc: str = "features", resume_dir: Optional[PathLike] = None,
                     identity: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Features of every image in ``ds`` (float32, CPU, dataset order). Under torch.distributed each rank takes
    every world-th image and the features are all-gathered. ``progress``: a bar with an ETA on rank 0.
    ``resume_dir`` (one process): extract in chunks of ``RESUME_CHUNK`` images, each written there atomically as it
    is done, and reuse the chunks already there, so that an interrupted extraction continues where it stopped;
    ``identity`` (what is extracted: reference, split, subset, extractor) must match the one the folder was begun
    with."""
    if resume_dir is not None and _dist()[1] == 1:
        return _extract_resumable(ds, extractor, Path(resume_dir), identity or {}, batch_size=batch_size,
                                  num_workers=num_workers, amp_dtype=amp_dtype, progress=progress, desc=desc)
    rank, world = _dist()
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    shard = Subset(ds, list(range(rank, len(ds), world))) if world > 1 else ds
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
    parts: dict[str, list[torch.Tensor]] = {}
    for images in progress_bar(loader, desc=f"{desc} features", enabled=progress and rank == 0, unit="batch"):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = extractor.features(images.to(device, non_blocking=True))
        for k, v in out.items():
            parts.setdefault(k, []).append(v.float())
    feats = {k: torch.cat(v) for k, v in parts.items()}
    if world > 1:
        feats = {k: _gather(v, len(ds), world) for k, v in feats.items()}
    return {k: v.cpu() for k, v in feats.items()}


RESUME_CHUNK = 2500  # images per chunk of a resumable extraction (50k Inception features: 20 files of ~40 MB)


def _extract_resumable(ds: Dataset, extractor: FeatureExtractor, folder: Path, identity: dict, **kw) -> dict:
    identity = {**{k: str(v) for k, v in identity.items()}, "images": str(len(ds)), "chunk": str(RESUME_CHUNK)}
    folder.mkdir(parents=True, exist_ok=True)
    begun = folder / "identity.json"
    if begun.is_file():
        found = read_json(begun)
        if found != identity:
            differ = ", ".join(f"{k} {found.get(k)} -> {identity.get(k)}" for k in sorted(set(found) | set(identity))
                               if found.get(k) != identity.get(k))
            raise ValueError(f"{folder} holds the partial features of another extraction ({differ}); delete it, or "
                             "rerun the command that began it")
    else:
        write_json(begun, identity)
    starts = range(0, len(ds), RESUME_CHUNK)
    parts = []
    for i, start in enumerate(starts):
        path = folder / f"chunk_{start:08d}.npz"
        if path.is_file():
            parts.append({k: torch.from_numpy(v) for k, v in np.load(path, allow_pickle=False).items()})
            continue
        part = extract_features(Subset(ds, range(start, min(start + RESUME_CHUNK, len(ds)))), extractor,
                                **dict(kw, desc=f"{kw['desc']} {i + 1}/{len(starts)}"))
        with atomic_write(path, suffix=".npz") as tmp:
            np.savez(tmp, **{k: v.numpy() for k, v in part.items()})
        parts.append(part)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _gather(x: torch.Tensor, total: int, world: int) -> torch.Tensor:
    """Undo the rank-strided sharding: rank r holds items r, r + W, ...; pad to equal length, gather, interleave."""
    per = -(-total // world)
    padded = torch.zeros(per, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.stack(out, 1).reshape(per * world, *x.shape[1:])[:total]


def _open_reference(ref: PathLike, split: str, image_size: Optional[int]):
    """(arrays of a reference .npz, None) or (None, its images): REF checked before any network is loaded."""
    if not str(ref).endswith((".npz", ".npy")):
        return None, open_images(ref, split, image_size)
    arrays = load_image_arrays(ref)
    if not ("mu" in arrays and "sigma" in arrays) and "arr_0" not in arrays:
        raise ValueError(f"{ref} has neither 'mu'/'sigma' statistics nor 'arr_0' images (or uint8 images under "
                         "another key)")
    if "arr_0" in arrays:
        NpzImages(ref, image_size, arrays)  # checks the images' dtype and shape
    return arrays, None


def _reference(ref: PathLike, ext: FeatureExtractor, need_features: bool, split: str, opened, **kw):
    """(stats dict with mu/sigma[/mu_s/sigma_s], pool/… features or None, description of what was used)."""
    stats, (arrays, images) = {}, opened
    if arrays is not None:
        if "mu" in arrays and "sigma" in arrays:
            tag = stats_extractor_tag(arrays)
            if (tag is None and ext.standard) or tag == ext.stats_tag:
                stats = {k: arrays[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in arrays}
            elif "arr_0" not in arrays:
                raise ValueError(f"{ref} holds statistics of {tag or 'the TF Inception network'}, not of extractor "
                                 f"{ext.name!r}; give reference images (a folder or an .npz with arr_0) instead")
    if stats and not need_features:
        return stats, None, "stats"
    if stats and REF_FEATURES_KEY in arrays:  # features stored with the statistics (--save-ref-features)
        pool = arrays[REF_FEATURES_KEY]
        keep = fixed_subset_indices(len(pool), kw["num_ref"]) if kw["num_ref"] and kw["num_ref"] < len(pool) else None
        pool = torch.from_numpy(np.ascontiguousarray(pool if keep is None else pool[keep], dtype=np.float32))
        return stats, {"pool": pool}, len(pool)
    if arrays is not None and "arr_0" not in arrays:  # stats only: no precision / recall possible
        return stats, None, "stats"
    ds = NpzImages(ref, kw["image_size"], arrays) if arrays is not None else images
    ds = subset(ds, kw["num_ref"])
    identity = dict(ref=os.path.abspath(ref) if os.path.exists(ref) else ref, split=split, num_ref=kw["num_ref"],
                    image_size=kw["image_size"], extractor=ext.stats_tag, amp_dtype=kw["amp_dtype"])
    feats = extract_features(ds, ext, kw["batch_size"], kw["num_workers"], kw["amp_dtype"], kw["progress"], "reference",
                             kw["resume_dir"], identity)
    if not stats:
        stats["mu"], stats["sigma"] = feature_statistics(feats["pool"])
        if "spatial" in feats:
            stats["mu_s"], stats["sigma_s"] = feature_statistics(feats["spatial"])
    return stats, feats, len(ds)


def evaluate_generative(samples: PathLike, ref: PathLike, extractor: Union[str, FeatureExtractor] = "fid-helper",
                        num_samples: Optional[int] = None, num_ref: Optional[int] = None, batch_size: int = 50,
                        num_workers: int = 2, image_size: Optional[int] = None, split: str = "val",
                        ref_split: str = "train", precision_recall_k: Optional[int] = 3,
                        amp_dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None,
                        save_ref_stats: Optional[PathLike] = None, progress: bool = True,
                        kid_subsets: Optional[int] = None, kid_subset_size_max: int = KID_SUBSET_SIZE,
                        save_ref_features: bool = False) -> dict:
    """All metrics the extractor supports: FID (pool), sFID (spatial), IS (logits), KID and precision / recall (pool
    features of both sets; not computed when REF is a stats-only file, or when ``kid_subsets`` / ``precision_recall_k``
    is None; ``arvision eval fid`` asks for KID with torch-fidelity's 100 subsets, callers that score small online
    sample sets leave it off). Names are FID, sFID, IS, KID for the standard Inception and FD-<name>, IS-<name>, ... otherwise. A
    metric the inputs do not allow (IS with fewer samples than its 10 splits, KID or precision / recall without
    reference images) is left out and named with the reason under ``skipped``; the others are still reported. Every
    rank returns the results."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    # both inputs are checked before the network is built (loading Inception takes a while)
    sample_ds = subset(open_images(samples, split, image_size), num_samples)
    ref_opened = _open_reference(ref, ref_split, image_size)
    ext = build_extractor(extractor, device)
    # with --save-ref-stats the reference's features are kept in chunks beside it until the file is written, so an
    # interrupted extraction (50k Inception passes: hours on a CPU) continues when the command is run again
    resume_dir = Path(f"{save_ref_stats}.parts") if save_ref_stats else None
    kw = dict(image_size=image_size, num_ref=num_ref, batch_size=batch_size, num_workers=num_workers,
              amp_dtype=amp_dtype, progress=progress, resume_dir=resume_dir)
    need_ref_features = precision_recall_k is not None or kid_subsets is not None or save_ref_features
    ref_stats, ref_feats, ref_used = _reference(ref, ext, need_ref_features, ref_split, ref_opened, **kw)
    feats = extract_features(sample_ds, ext, batch_size, num_workers, amp_dtype, progress, "samples")
    name = ext.metric_name
    res: dict = {}
    mu, sigma = feature_statistics(feats["pool"])
    res[name("FID")] = frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"])
    if "spatial" in feats and "mu_s" in ref_stats:
        mu_s, sigma_s = feature_statistics(feats["spatial"])
        res[name("sFID")] = frechet_distance(mu_s, sigma_s, ref_stats["mu_s"], ref_stats["sigma_s"])
    skipped: dict[str, str] = {}
    if "logits" in feats:
        if len(feats["logits"]) >= IS_SPLITS:
            res[name("IS")], res[name("IS") + "_std"] = inception_score(logits=feats["logits"], splits=IS_SPLITS)
        else:
            skipped[name("IS")] = (f"needs at least {IS_SPLITS} samples (one per split), got "
                                   f"{len(feats['logits'])}")
    no_ref_images = "REF is a statistics file; it needs reference images (a folder or an .npz with images)"
    if kid_subsets is not None:
        if ref_feats is None:
            skipped[name("KID")] = no_ref_images
        else:
            res[name("KID")], res[name("KID") + "_std"] = kernel_inception_distance(
                feats["pool"], ref_feats["pool"], subsets=kid_subsets, subset_size=kid_subset_size_max)
            res.update(kid_subsets=kid_subsets,
                       kid_subset_size=kid_subset_size(len(feats["pool"]), len(ref_feats["pool"]), kid_subset_size_max))
    labels = sample_labels(samples, sample_ds)
    if labels is not None and "logits" in feats and not ext.standard:  # a judge of the generator's own classes
        res["sample_accuracy"] = sample_accuracy(feats["logits"], labels)
    if precision_recall_k is not None:
        smallest = min(len(feats["pool"]), len(ref_feats["pool"])) if ref_feats is not None else 0
        if ref_feats is None:
            skipped[name("precision")] = skipped[name("recall")] = no_ref_images
        elif smallest <= precision_recall_k:
            skipped[name("precision")] = skipped[name("recall")] = (
                f"needs more than k={precision_recall_k} samples and reference images, got {smallest}")
        else:
            pr = precision_recall(ref_feats["pool"], feats["pool"], k=precision_recall_k)
            res[name("precision")], res[name("recall")] = pr["precision"], pr["recall"]
    res.update(extractor=ext.name, feature_space=ext.stats_tag, samples=str(samples), num_samples=len(sample_ds),
               ref=str(ref), num_ref=ref_used, supported=list(ext.provides), image_size=image_size,
               precision_recall_k=precision_recall_k if ref_feats is not None else None)
    if skipped:
        res["skipped"] = skipped
    if save_ref_stats and _dist()[0] == 0:
        save_stats(save_ref_stats, ref_stats, extractor=ext.stats_tag,
                   features=ref_feats["pool"] if save_ref_features and ref_feats is not None else None,
                   num_images=ref_used if isinstance(ref_used, int) else None)
        if resume_dir is not None and resume_dir.is_dir():
            shutil.rmtree(resume_dir)
    return res


def sample_labels(samples: PathLike, sample_ds: Dataset) -> Optional[torch.Tensor]:
    """The conditioning labels of the evaluated samples (``arr_1`` of an ADM .npz, in the order of ``sample_ds``),
    or None when the samples carry none."""
    if not str(samples).endswith(".npz"):
        return None
    arrays = load_image_arrays(samples)
    if "arr_1" not in arrays or len(arrays["arr_1"]) != len(arrays["arr_0"]):
        return None
    labels = torch.from_numpy(np.asarray(arrays["arr_1"]).astype(np.int64))
    return labels[torch.as_tensor(sample_ds.indices)] if isinstance(sample_ds, Subset) else labels
