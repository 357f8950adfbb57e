"""Writing a token cache (``token_cache.py`` reads it): encode a dataset once with a tokenizer, on one or many
processes.

    stats = build_token_cache(tok, "/data/cifar10", "cache/c10", img_size=32)     # or `arvision tokenizer encode`

Interruptions: a batch's rows are flushed before ``done.npy`` marks them, and every header is written atomically
(temp file + rename). ``complete`` is set only after every row is marked, and TokenCache refuses an incomplete
cache. Re-running the same encode (with any number of processes) encodes only the unmarked batches. The header
records what made the cache: the tokenizer's config and a SHA-256 of its weights, the data source, split, subset,
crop size and flip copies, and bf16 encoding; an encode with anything else into an existing cache is a one-line
error (``overwrite=True``, ``--overwrite``, re-encodes it). The arrays' disk space is checked and reserved
(``posix_fallocate``) before any row is written: memory-mapped arrays are sparse, and a page written on a full disk
would kill the process with SIGBUS.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ..files import write_json
from .token_cache import (
    DONE, FORMAT, HEADER, LABELS, TOKENIZER_DIR, TOKENS, VALID, VERSION, PathLike, read_header,
)


def _write_header(path: Path, header: dict) -> None:
    write_json(path, header, indent=1, fsync=True)  # on the disk before it counts the rows it names




class _Images(Dataset):
    """(uint8 image, label, ok) per index of an arvision dataset, without the replace-by-next of corrupt images."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            load = getattr(self.dataset, "_load", self.dataset.__getitem__)  # _load: no replacement of bad images
            img, label = load(i)
            return self.transform(img), int(label), True
        except Exception:  # noqa: BLE001 - any decode failure counts as a skipped image
            size = self.transform.img_size
            return torch.zeros(3, size, size, dtype=torch.uint8), -1, False


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes of every tensor, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _settings(tokenizer, source, split: str, img_size: int, num_images: int, flip: bool, amp: bool = False,
              ten_crop: bool = False, crop_range: float = 1.1) -> dict:
    """What a cache's tokens depend on: the tokenizer (config and weights), the data (source, split, count), the
    crop (centre crop to ``img_size``, or ten crops of a centre crop ``crop_range`` times larger), the copies and bf16
    encoding."""
    cfg = tokenizer.config.to_dict()
    return dict(family=tokenizer.family, tokenizer_config=cfg, tokenizer_sha256=weights_sha256(tokenizer),
                source=str(Path(source).resolve()) if Path(str(source)).exists() else str(source), split=split,
                crop=f"ten-crop {crop_range}x" if ten_crop else "center", img_size=img_size, num_images=num_images,
                copies=10 if ten_crop else 2 if flip else 1, bf16=bool(amp))


_SETTING_NAMES = {"tokenizer_sha256": "tokenizer weights", "tokenizer_config": "tokenizer config",
                  "copies": "copies (flip)"}


def _settings_differ(header: dict, settings: dict) -> list[str]:
    """The settings of an existing cache's header that differ from ``settings`` ('name (cache X, now Y)')."""
    wanted = json.loads(json.dumps(settings))
    out = []
    for key, value in wanted.items():
        if header.get(key) != value:
            old = "not recorded" if key not in header else header[key]
            if key == "tokenizer_sha256" and isinstance(old, str):
                old, value = old[:12], value[:12]
            if key == "tokenizer_config":
                out.append(_SETTING_NAMES[key])
            else:
                out.append(f"{_SETTING_NAMES.get(key, key)} (cache {old}, now {value})")
    return out


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _check_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(_existing_parent(out)).free
    if needed > free:
        raise ValueError(f"not enough disk space for the token cache {out}: it needs {_gigabytes(needed)}, "
                         f"{_gigabytes(free)} free on that file system; free space or choose another --out")


def _reserve(paths: list[Path], out: Path) -> None:
    """Allocate every block of the (sparse) array files now, so that writing a row later never finds the disk
    full (a memory-mapped page written on a full disk is a SIGBUS, not an error)."""
    if not hasattr(os, "posix_fallocate"):
        return
    for path in paths:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise ValueError(f"no space left for the token cache {out}: reserving {path.name} failed ({e.strerror})"
                                 f"; free space on that file system (the cache resumes where it stopped) or choose "
                                 "another --out") from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(fd)


@torch.no_grad()
def build_token_cache(tokenizer, source: PathLike, out: PathLike, split: str = "train", img_size: int = 256,
                      batch_size: int = 64, num_workers: int = 2, flip: bool = True, device: str = "cpu",
                      amp: bool = False, limit: Optional[int] = None, progress: bool = True,
                      tokenizer_source: Optional[str] = None, overwrite: bool = False, ten_crop: bool = False,
                      crop_range: float = 1.1) -> dict:
    """Encode ``split`` of ``source`` (image folder, HF save_to_disk folder or 'synthetic') into a cache at ``out``.

    Copies per image: the centre crop and its mirror (``flip``), the centre crop alone, or (``ten_crop``, LlamaGen's
    ``extract_codes_c2i --ten-crop``) the ten ``img_size`` crops (centre and four corners, each with its mirror) of
    the image centre-cropped to ``int(img_size * crop_range)``; copy 0 is always the centre crop.
    Under torchrun (the process group joined first) the batches are shared out: batch b to process b mod K, every
    process writing its rows of the one cache; the same batches are encoded whatever K is, so K processes write the
    same cache as one.

    Resumes a partial cache made with the same settings and returns at once for a complete one; a cache made with
    other settings (another tokenizer's weights or config, other data, crop size, flip copies or precision) is a
    one-line ValueError naming them, unless ``overwrite`` (then it is encoded again). Disk space for the arrays is
    checked before anything is written and reserved before the first row.
    Returns {"num_images", "skipped", "seconds", "images_per_second", "resumed_from", "encoded_here" (by this
    process)}."""
    from tqdm import tqdm

    from ..checkpoints import save_model
    from .datasets import build_dataset, fixed_subset_indices
    from .transforms import generation_transform

    out = Path(out)
    if ten_crop and not crop_range >= 1:
        raise ValueError(f"crop range (--crop-range) must be >= 1: the ten crops are taken from a centre crop that "
                         f"much larger than img_size, got {crop_range}")
    rank, world = _rank_world()
    dataset = build_dataset(source, split, transform=None, img_size=img_size)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    # a limit takes a fixed random subset (seed 0, in dataset order): the first N of a class-sorted folder would be
    # a few classes only
    order = list(range(n)) if n == len(dataset) else fixed_subset_indices(len(dataset), n)
    grid = tokenizer.grid_size(img_size)
    settings = _settings(tokenizer, source, split, img_size, n, flip, amp, ten_crop, crop_range)
    settings["subset"] = None if n == len(dataset) else "random-seed0"
    header = None
    if (out / HEADER).is_file():
        try:
            header = read_header(out)
        except ValueError as e:
            if not overwrite:
                raise ValueError(f"{e} (or pass --overwrite to replace it)") from None
    differ = _settings_differ(header, settings) if header is not None else []
    if differ and not overwrite:
        raise ValueError(f"token cache {out} was made with other settings: {'; '.join(differ)}; pass --overwrite to "
                         "encode it again with these, or choose another --out")
    same = header is not None and not differ
    if same and header.get("complete"):
        return dict(num_images=n, skipped=header["skipped"], seconds=0.0, images_per_second=None, resumed_from=n)
    discrete = tokenizer.token_type == "discrete"
    copies, N = settings["copies"], grid * grid
    if discrete:
        dtype = np.int16 if tokenizer.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
        shape = (n, copies, N)
    else:
        dtype, shape = np.float32, (n, copies, N, 2 * tokenizer.latent_channels)
    arrays = [out / TOKENS, out / LABELS, out / VALID, out / DONE]
    try:  # process 0 makes or checks the files; the others wait for it (a collective) and share its verdict
        if rank == 0:
            if not same:  # fresh start (nothing, or --overwrite of a cache of other settings / a damaged header)
                if out.exists():
                    for name in (HEADER, TOKENS, LABELS, VALID, DONE):
                        (out / name).unlink(missing_ok=True)
                    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
                weights = sum(t.numel() * t.element_size() for t in tokenizer.state_dict().values())
                _check_space(out, int(np.prod(shape)) * np.dtype(dtype).itemsize + n * 10 + weights + (1 << 20))
                out.mkdir(parents=True, exist_ok=True)
                np.lib.format.open_memmap(out / TOKENS, mode="w+", dtype=dtype, shape=shape).flush()
                np.lib.format.open_memmap(out / LABELS, mode="w+", dtype=np.int64, shape=(n,)).flush()
                np.lib.format.open_memmap(out / VALID, mode="w+", dtype=np.uint8, shape=(n,)).flush()
                np.lib.format.open_memmap(out / DONE, mode="w+", dtype=np.uint8, shape=(n,)).flush()
                save_model(tokenizer, out / TOKENIZER_DIR)
                classes = list(getattr(dataset, "classes", []) or [])
                header = dict(format=FORMAT, version=VERSION, **settings, token_type=tokenizer.token_type,
                              codebook_size=tokenizer.codebook_size, latent_channels=tokenizer.latent_channels,
                              grid_size=grid, scale_factor=tokenizer.scale_factor,
                              stores="codes" if discrete else "moments", dtype=np.dtype(dtype).name, classes=classes,
                              num_classes=len(classes) or None, tokenizer=tokenizer_source, encoded=0, skipped=0,
                              complete=False)
                _write_header(out / HEADER, header)
            else:  # resuming: arrays written before their space was reserved may still be sparse
                if not (out / DONE).is_file():  # a cache begun by a version that wrote rows in order only
                    flags = np.lib.format.open_memmap(out / DONE, mode="w+", dtype=np.uint8, shape=(n,))
                    flags[:int(header["encoded"])] = 1
                    flags.flush()
                _check_space(out, sum(max(0, p.stat().st_size - p.stat().st_blocks * 512) for p in arrays))
            _reserve(arrays, out)
            verdict = (None, header, int(np.count_nonzero(np.load(out / DONE, mmap_mode="r"))))
    except Exception as e:
        if world > 1:
            _share(f"{e}")
        raise
    if world > 1:
        verdict = _share(verdict if rank == 0 else None)
        if verdict is None or isinstance(verdict, str):
            raise ValueError(verdict or "process 0 stopped while preparing the token cache")
    _, header, resumed_from = verdict
    tokens, labels, valid, done = (np.load(out / name, mmap_mode="r+") for name in (TOKENS, LABELS, VALID, DONE))
    # batch b (rows b*batch_size ...) is process (b mod world)'s: the same batches whatever the number of processes
    num_batches = -(-n // batch_size)
    mine = [b for b in range(rank, num_batches, world) if not done[b * batch_size:(b + 1) * batch_size].all()]
    rows = [r for b in mine for r in range(b * batch_size, min((b + 1) * batch_size, n))]
    tokenizer = tokenizer.to(device).eval()
    crop_size = int(img_size * crop_range) if ten_crop else img_size
    images = torch.utils.data.Subset(_Images(dataset, generation_transform(crop_size)), [order[r] for r in rows])
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    t0 = time.perf_counter()
    for b, (x, y, ok) in zip(mine, tqdm(loader, desc="encode", disable=not progress or rank != 0, total=len(loader))):
        B, row = x.shape[0], b * batch_size
        x = _views(x.to(device).float().div_(127.5).sub_(1.0), img_size, flip, ten_crop)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            z = tokenizer.encode(x) if discrete else tokenizer.encode_moments(x)
        if discrete:
            z = z.reshape(copies, B, N).transpose(0, 1)
        else:
            z = z.float().reshape(copies, B, z.shape[1], N).permute(1, 0, 3, 2)
        tokens[row:row + B] = z.cpu().numpy().astype(dtype)
        labels[row:row + B] = y.numpy()
        valid[row:row + B] = ok.numpy().astype(np.uint8)
        for arr in (tokens, labels, valid):
            arr.flush()
        done[row:row + B] = 1  # only once its rows are flushed
        done.flush()
        if rank == 0:
            header.update(encoded=int(np.count_nonzero(done)), skipped=_skipped(done, valid))
            _write_header(out / HEADER, header)
    seconds = time.perf_counter() - t0
    if world > 1:
        dist.barrier()
    skipped = _skipped(done, valid)
    if rank == 0:
        missing = n - int(np.count_nonzero(done))
        if missing:
            raise ValueError(f"token cache {out}: {missing} of {n} images are still not encoded after every process "
                             "finished; rerun the same `arvision tokenizer encode` to encode them")
        if skipped:
            print(f"token cache: skipped {skipped} unreadable image(s)")
        for name in (TOKENS, LABELS, VALID):
            with open(out / name, "rb+") as f:
                os.fsync(f.fileno())
        if header["num_classes"] is None:
            header["num_classes"] = int(np.asarray(labels).max()) + 1 if n else 0
        header.update(encoded=n, skipped=skipped, complete=True, encode_seconds=round(seconds, 3))
        _write_header(out / HEADER, header)
        (out / DONE).unlink(missing_ok=True)
    return dict(num_images=n, skipped=skipped, seconds=seconds, resumed_from=resumed_from, encoded_here=len(rows),
                images_per_second=len(rows) / seconds if seconds > 0 else None)


def _skipped(done: np.ndarray, valid: np.ndarray) -> int:
    """Rows encoded whose image could not be read."""
    return int(np.count_nonzero(np.asarray(done, dtype=bool) & (np.asarray(valid) == 0)))


def _views(x: torch.Tensor, img_size: int, flip: bool, ten_crop: bool) -> torch.Tensor:
    """The copies of a batch (B, 3, H, W) to encode, copy-major: the image, or the image and its mirror, or (ten crop)
    the centre, top-left, top-right, bottom-left and bottom-right ``img_size`` crops, each followed by its mirror."""
    if ten_crop:
        from torchvision.transforms.functional import five_crop

        tl, tr, bl, br, center = five_crop(x, [img_size, img_size])
        return torch.cat([view for crop in (center, tl, tr, bl, br) for view in (crop, crop.flip(-1))])
    return torch.cat([x, x.flip(-1)]) if flip else x


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("under torchrun, build_token_cache needs the process group joined first "
                         "(arvision.train.distributed.join_process_group(), as `arvision tokenizer encode` does)")
    return 0, 1


def _share(obj):
    """``obj`` of process 0, on every process (a collective)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
