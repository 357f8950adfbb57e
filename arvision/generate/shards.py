"""Sampling into a directory in shards, over any number of processes, resumable (``arvision sample``; torchrun).

The samples 0 .. M-1 (labels from ``class_labels``: every class ``num_per_class`` times in a seeded random order) are
cut into shards of ``shard_size`` consecutive samples, and each shard into batches of ``batch_size``. Process r of K
draws every K-th missing shard and writes it when it is finished to ``shards/shard_XXXXXX.npz`` (a temporary name,
fsync, rename: a shard file is complete or absent). A sample's randomness is its own (``sample_tokens``) and a shard is
cut into the same batches whatever K is, so K processes write the same bits as one. When every shard exists, process
0 streams them into ``samples.npz`` (ADM layout: ``arr_0`` uint8 (M, H, W, 3), ``arr_1`` int64 labels; written under
a temporary name and renamed last), writes the grid ``samples.png`` and ``sample.json``, then deletes the shards.
Memory holds one shard (and the grid's few images), whatever M is.

``sampling.json``, written first, records what the samples depend on: the generator's and tokenizer's configs and
weights (SHA-256), the classes, samples per class, seed, every sampling setting, batch and shard size. Each shard
carries the fingerprint of these settings. Running the same command again (or with ``resume=True``) skips the
finished shards; other settings in the same directory are a one-line error naming them, never a mixed output.

    settings = sampling_settings(model, tokenizer, classes, 50, seed=0, config=cfg, batch_size=64, shard_size=500)
    result = sample_to_directory(model, tokenizer, labels, cfg, "samples/", settings)   # labels = class_labels(...)
    samples_npz("samples/")   # samples/samples.npz, or a one-line error saying how many samples are missing
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.token_cache_writer import weights_sha256
from ..files import atomic_write, write_json
from ..train.distributed import join_process_group
from .outputs import generate_images, save_grid
from .sample import SamplingConfig

FORMAT, VERSION = "arvision-samples", 1
MANIFEST, SHARDS, NPZ, GRID, META = "sampling.json", "shards", "samples.npz", "samples.png", "sample.json"
SHARD_KEYS = {"images", "labels", "start", "fingerprint"}
PathLike = Union[str, os.PathLike]

_NAMES = {"generator_sha256": "generator weights", "generator_config": "generator config",
          "tokenizer_sha256": "tokenizer weights", "tokenizer_config": "tokenizer config"}


def sampling_settings(model, tokenizer, classes, num_per_class: int, seed: int, config: SamplingConfig,
                      batch_size: int, shard_size: int, scale_factor: float = 1.0) -> dict:
    """Everything the samples of a directory depend on (JSON values)."""
    for name, flag, value in (("shard size", "--shard-size", shard_size), ("batch size", "--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"the {name} ({flag}) must be at least 1, got {value}")
    settings = dict(generator_sha256=weights_sha256(model), generator_config=model.config.to_dict(),
                    tokenizer_sha256=weights_sha256(tokenizer), tokenizer_config=tokenizer.config.to_dict(),
                    scale_factor=float(scale_factor), classes=[int(c) for c in classes],
                    num_per_class=int(num_per_class), seed=int(seed), **asdict(config), batch_size=int(batch_size),
                    shard_size=int(shard_size))
    return json.loads(json.dumps(settings))


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            name = _NAMES.get(key, key)
            if key.endswith("_config"):
                out.append(name)
            elif key.endswith("_sha256"):
                out.append(f"{name} (then {str(old.get(key))[:12]}, now {str(new.get(key))[:12]})")
            else:
                out.append(f"{name} (then {old.get(key, 'not recorded')}, now {new.get(key, 'not recorded')})")
    return out


class SampleDirectory:
    """The files of a sampling directory: manifest, shards, the assembled .npz."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.manifest_path, self.shard_dir, self.npz = self.path / MANIFEST, self.path / SHARDS, self.path / NPZ

    def manifest(self) -> Optional[dict]:
        if not self.manifest_path.is_file():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.manifest_path} is damaged ({e}); delete {self.path} and sample again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{self.manifest_path} is not an arvision sampling manifest; choose another --out")
        return manifest

    def shard_path(self, shard: int) -> Path:
        return self.shard_dir / f"shard_{shard:06d}.npz"

    def shard_ok(self, shard: int, manifest: dict, labels: np.ndarray) -> bool:
        """True for a complete shard of these settings: its fingerprint, first index and labels, and an image array
        header of the right count whose bytes are all there (the image bytes themselves are read at assembly,
        where the zip checksum covers them)."""
        start, end = _shard_range(shard, manifest)
        path = self.shard_path(shard)
        try:
            with np.load(path, allow_pickle=False) as z:
                if set(z.files) != SHARD_KEYS or str(z["fingerprint"]) != manifest["fingerprint"] \
                        or int(z["start"]) != start or not np.array_equal(z["labels"], labels[start:end]):
                    return False
            shape, dtype, size = _npy_member_header(path, "images.npy")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return False
        return len(shape) == 4 and shape[0] == end - start and shape[3] == 3 and dtype == np.uint8 and \
            size == int(np.prod(shape))

    def done_shards(self, manifest: dict, labels: np.ndarray) -> list[int]:
        if not self.shard_dir.is_dir():
            return []
        return [s for s in range(manifest["num_shards"]) if self.shard_path(s).is_file()
                and self.shard_ok(s, manifest, labels)]

    def status(self) -> dict:
        """{"num_samples", "done", "missing", "shards", "shards_done", "complete"} of a sampling directory."""
        from .outputs import class_labels

        manifest = self.manifest()
        if manifest is None:
            raise ValueError(f"{self.path} is not a sampling directory (no {MANIFEST})")
        total = manifest["num_samples"]
        if self.npz.is_file():
            return dict(num_samples=total, done=total, missing=0, shards=manifest["num_shards"],
                        shards_done=manifest["num_shards"], complete=True)
        s = manifest["settings"]
        labels = class_labels(s["classes"], s["num_per_class"], s["seed"]).numpy()
        done = self.done_shards(manifest, labels)
        count = sum(end - start for start, end in (_shard_range(d, manifest) for d in done))
        return dict(num_samples=total, done=int(count), missing=int(total - count), shards=manifest["num_shards"],
                    shards_done=len(done), complete=False)


def _shard_range(shard: int, manifest: dict) -> tuple[int, int]:
    size = manifest["settings"]["shard_size"]
    return shard * size, min((shard + 1) * size, manifest["num_samples"])


def _npy_member_header(path: Path, member: str) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, number of data bytes present) of an .npy member of a zip, without reading its data."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        with zf.open(member) as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f)
            header = f.tell()
    if fortran:
        raise ValueError("fortran order")
    return shape, dtype, (info.file_size - header) // dtype.itemsize


def samples_npz(path: PathLike) -> Path:
    """What ``arvision eval fid`` reads for SAMPLES: a complete sampling directory (or its samples.npz) gives its
    samples.npz; an incomplete one is a one-line error saying how many samples are missing; anything else is
    returned as given."""
    p = Path(path)
    directory = p if p.is_dir() else p.parent if p.name == NPZ else None
    if directory is None or not (directory / MANIFEST).is_file():
        return p
    status = SampleDirectory(directory).status()
    if not status["complete"]:
        raise ValueError(f"{directory} is an incomplete sampling directory: {status['missing']} of "
                         f"{status['num_samples']} samples are missing ({status['shards_done']} of {status['shards']} "
                         "shards written); rerun the same `arvision sample` command to finish it")
    return directory / NPZ


def _write_shard(path: Path, images: torch.Tensor, labels: torch.Tensor, start: int, fingerprint_: str) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images.numpy(), labels=labels.numpy().astype(np.int64), start=np.int64(start),
                 fingerprint=np.array(fingerprint_))
        f.flush()
        os.fsync(f.fileno())


def _broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _check_directory(directory: SampleDirectory, settings: dict, num_samples: int, resume: bool) -> Optional[dict]:
    """The existing manifest of ``directory`` (None when there is none), after checking it holds these settings;
    a one-line error otherwise. Nothing is written."""
    manifest = directory.manifest()
    where = directory.path
    if manifest is None:
        if resume:
            raise ValueError(f"--resume: {where} holds no sampling run to resume (no {MANIFEST}); run without "
                             "--resume to start one")
        if directory.npz.exists():
            raise ValueError(f"{where} already holds a {NPZ} from a run this version cannot check; choose another "
                             "--out")
        return None
    differ = _differences(manifest.get("settings") or {}, settings)
    if differ:
        raise ValueError(f"{where} holds samples made with other settings: {'; '.join(differ)}; rerun with the same "
                         f"settings to finish it, or choose another --out")
    if manifest.get("num_samples") != num_samples:
        raise ValueError(f"{where}: its manifest says {manifest.get('num_samples')} samples, these settings give "
                         f"{num_samples}; delete {where} or choose another --out")
    return manifest


class _GridRows:
    """The first ``per_row`` samples of each of the first ``max_classes`` classes, collected shard by shard."""

    def __init__(self, classes, per_row: int, max_classes: int, class_names: Optional[Sequence[str]] = None):
        self.per_row, self.class_names = per_row, class_names
        shown = sorted({int(c) for c in classes})[:max_classes]
        self.rows: dict[int, list[np.ndarray]] = {c: [] for c in shown}

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        for image, label in zip(images, labels):
            row = self.rows.get(int(label))
            if row is not None and len(row) < self.per_row:
                row.append(np.array(image))

    def save(self, path: Path) -> Path:
        labels = torch.tensor([c for c, row in self.rows.items() for _ in row])
        images = torch.from_numpy(np.stack([im for row in self.rows.values() for im in row]))
        return save_grid(images, labels, path, per_row=self.per_row, labelled=True, class_names=self.class_names)


def _assemble(directory: SampleDirectory, manifest: dict, labels: np.ndarray, grid: _GridRows,
              meta: Optional[dict]) -> dict:
    """Stream the shards into samples.npz (renamed into place last), then the grid and sample.json; delete the
    shards."""
    total = manifest["num_samples"]
    image_shape = None
    with atomic_write(directory.npz) as tmp:  # the samples appear complete or not at all
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                for shard in range(manifest["num_shards"]):
                    path = directory.shard_path(shard)
                    try:
                        with np.load(path, allow_pickle=False) as z:
                            images = z["images"]
                    except (OSError, ValueError, zipfile.BadZipFile) as e:
                        raise ValueError(f"shard {path} is unreadable ({e}); delete it and rerun the same command "
                                         "to draw it again") from None
                    if image_shape is None:
                        image_shape = images.shape[1:]
                        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(images.dtype),
                                                                 "fortran_order": False,
                                                                 "shape": (total, *image_shape)})
                    if images.shape[1:] != image_shape:
                        raise ValueError(f"shard {path} holds images of {images.shape[1:]}, the others "
                                         f"{image_shape}; delete it and rerun the same command")
                    f.write(np.ascontiguousarray(images).data)
                    start, end = _shard_range(shard, manifest)
                    grid.add(images, labels[start:end])
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                arr = labels.astype(np.int64)
                np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
                f.write(arr.data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        files = {"npz": str(directory.npz), "grid": str(grid.save(directory.path / GRID))}
        write_json(directory.path / META, dict(meta or {}, **files, num_samples=total,
                                               fingerprint=manifest["fingerprint"]), indent=1, default=str)
    shutil.rmtree(directory.shard_dir, ignore_errors=True)
    return files


@torch.no_grad()
def sample_to_directory(model, tokenizer, labels: torch.Tensor, config: SamplingConfig, out: PathLike,
                        settings: dict, resume: bool = False, progress: bool = True, meta: Optional[dict] = None,
                        grid_per_row: int = 16, grid_max_classes: int = 64,
                        class_names: Optional[Sequence[str]] = None) -> dict:
    """Draw the samples of ``labels`` into ``out`` as described in the module docstring, this process's share of
    the shards under torchrun. ``settings`` (``sampling_settings``) holds the seed, batch and shard size. The grid's
    rows are labelled with ``class_names`` (a token cache's ``classes``), else the class indices. Returns
    {"complete", "npz" (when complete), "num_samples", "shards_drawn" (by this process), "rank", "world_size"}."""
    shard_size, batch_size, seed = settings["shard_size"], settings["batch_size"], settings["seed"]
    total = int(labels.shape[0])
    directory = SampleDirectory(out)
    manifest = _check_directory(directory, settings, total, resume)
    rank, world = join_process_group()
    result = dict(num_samples=total, shards_drawn=0, rank=rank, world_size=world)
    if manifest is not None and directory.npz.is_file():
        return dict(result, complete=True, npz=str(directory.npz), already=True)
    if manifest is None:
        manifest = dict(format=FORMAT, version=VERSION, fingerprint=fingerprint(settings), num_samples=total,
                        num_shards=-(-total // shard_size), settings=settings)
    labels_np = labels.cpu().numpy()
    missing = None
    if rank == 0:
        directory.shard_dir.mkdir(parents=True, exist_ok=True)
        if not directory.manifest_path.is_file():
            write_json(directory.manifest_path, manifest, indent=1, default=str)
        for leftover in directory.shard_dir.glob(".*.tmp-*"):  # from a process killed while writing
            leftover.unlink(missing_ok=True)
        done = set(directory.done_shards(manifest, labels_np))
        missing = [s for s in range(manifest["num_shards"]) if s not in done]
    missing = _broadcast(missing, rank, world)  # every process starts from one listing
    mine = missing[rank::world]
    model, tokenizer = model.eval(), tokenizer.eval()
    scale = settings["scale_factor"]
    for shard in tqdm(mine, desc=f"shards (rank {rank})" if world > 1 else "shards", disable=not progress or rank):
        start, end = _shard_range(shard, manifest)
        images = generate_images(model, tokenizer, labels[start:end], config, batch_size, seed, scale,
                                 progress=False, first_index=start)
        _write_shard(directory.shard_path(shard), images, labels[start:end], start, manifest["fingerprint"])
        result["shards_drawn"] += 1
    if world > 1:
        dist.barrier()
    if rank != 0:
        return dict(result, complete=False)
    done = directory.done_shards(manifest, labels_np)
    if len(done) != manifest["num_shards"]:
        raise ValueError(f"{len(done)} of {manifest['num_shards']} shards are in {directory.shard_dir} after "
                         "sampling; rerun the same command to draw the rest")
    grid = _GridRows(settings["classes"], min(grid_per_row, settings["num_per_class"]), grid_max_classes,
                     class_names)
    files = _assemble(directory, manifest, labels_np, grid, meta)
    return dict(result, complete=True, **files)
