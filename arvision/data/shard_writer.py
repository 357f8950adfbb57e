"""Writing WebDataset tar shards from an image folder (``shards.py`` describes the layout and reads them).

    write_shards("/data/in1k", "/data/in1k-wds", "train")   # OUT/train-000000.tar ... + OUT/train.json
"""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..files import atomic_write, write_json
from .images import open_rgb
from .shards import _TAR_BLOCK, INDEX_KIND, _webdataset

logger = logging.getLogger("arvision.data")


def _checked_bytes(path: str) -> tuple[Optional[bytes], str]:
    """(the file's bytes, "") when it decodes as an image, else (None, why)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        open_rgb(io.BytesIO(data))
        return data, ""
    except Exception as e:  # noqa: BLE001 - any decode failure, as the folder reader skips them
        return None, f"{type(e).__name__}: {e}"


def _sample_key(path: Path, root: Path, used: set[str]) -> str:
    """``<class>/<stem>`` with dots of the stem made '_' (WebDataset keys end at the first dot); unique."""
    rel = path.relative_to(root).with_suffix("")
    key = "/".join([*rel.parts[:-1], rel.name.replace(".", "_")])
    unique, n = key, 1
    while unique in used:
        unique, n = f"{key}_{n}", n + 1
    used.add(unique)
    return unique


def _tar_bytes(members: dict[str, bytes]) -> int:
    return sum(_TAR_BLOCK + -(-len(v) // _TAR_BLOCK) * _TAR_BLOCK for v in members.values())


def write_shards(folder: str | os.PathLike, out: str | os.PathLike, split: str = "train",
                 shard_size: Optional[int] = None, max_size_mb: Optional[float] = None, seed: Optional[int] = 0,
                 workers: int = 1, progress: Optional[Callable] = None) -> dict:
    """Write ``split`` of the image folder ``folder`` as shards ``out/<split>-NNNNNN.tar`` and the index
    ``out/<split>.json`` (returned). Images are listed by the folder reader (hidden names, links, empty classes as
    in training) and each is decoded once: those that fail are skipped and counted in one warning. ``seed``: the
    samples in a fixed random order (None: the folder's order); a shard ends at ``shard_size`` samples or before
    ``max_size_mb`` MB (default 1000 MB). Each shard is written atomically, the index last. ``progress(iterable,
    total=, desc=)`` wraps the images as they are read (a progress bar)."""
    from .datasets import ImageFolderDataset, check_split_classes, resolve_split
    from .images import class_folders

    wds = _webdataset()
    folder, out = Path(folder), Path(out)
    if shard_size is not None and shard_size < 1 or max_size_mb is not None and max_size_mb <= 0:
        raise ValueError("--shard-size and --max-size must be positive")
    name = resolve_split(folder, split)
    if name != split:
        logger.warning("%s has no %s/ split: writing %s/ instead", folder, split, name)
    root = folder / name
    check_split_classes(folder, name, class_folders(root, folder))
    existing = sorted(out.glob(f"{name}-*.tar")) + sorted(out.glob(f"{name}.json")) if out.is_dir() else []
    if existing:
        raise FileExistsError(f"{out} already holds {name} shards ({existing[0].name}, ...); write to another folder "
                              f"or delete them first")
    listing = ImageFolderDataset(root, dataset_root=folder)
    order = list(range(len(listing.samples)))
    if seed is not None:
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    paths = [listing.samples[i][0] for i in order]
    max_bytes = None if shard_size else int((max_size_mb or 1000) * 2 ** 20)
    used_keys: set[str] = set()
    skipped: list[tuple[str, str]] = []
    shardlist: list[dict] = []
    counts = dict.fromkeys(listing.classes, 0)

    def checked() -> Iterator[tuple[int, Optional[bytes], str]]:
        if workers > 1:
            with multiprocessing.get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
                for i, (data, why) in zip(order, pool.imap(_checked_bytes, paths, chunksize=16)):
                    yield i, data, why
        else:
            for i, path in zip(order, paths):
                yield (i, *_checked_bytes(path))

    def flush(samples: list[dict]) -> None:
        shard = out / f"{name}-{len(shardlist):06d}.tar"
        with atomic_write(shard) as tmp, open(tmp, "wb") as f:
            writer = wds.TarWriter(f, mtime=0)  # fixed dates: the same folder gives the same bytes
            for sample in samples:
                writer.write(sample)
            writer.close()
        shardlist.append({"url": shard.name, "nsamples": len(samples), "filesize": shard.stat().st_size})

    out.mkdir(parents=True, exist_ok=True)
    pending, pending_bytes = [], 0
    images = checked() if progress is None else progress(checked(), total=len(order), desc=f"shard {name}")
    for i, data, why in images:
        path, label = listing.samples[i]
        if data is None:
            skipped.append((path, why))
            continue
        ext = Path(path).suffix.lstrip(".").lower()
        sample = {"__key__": _sample_key(Path(path), root, used_keys), ext: data, "cls": str(label).encode()}
        size = _tar_bytes({k: v for k, v in sample.items() if k != "__key__"})
        if pending and (len(pending) == shard_size if shard_size else pending_bytes + size > max_bytes):
            flush(pending)
            pending, pending_bytes = [], 0
        pending.append(sample)
        pending_bytes += size
        counts[listing.classes[label]] += 1
    if pending:
        flush(pending)
    if skipped:
        logger.warning("skipped %d unreadable image%s of %s (not in the shards): %s", len(skipped),
                       "" if len(skipped) == 1 else "s", root,
                       "; ".join(f"{p} ({why})" for p, why in skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    if not shardlist:
        raise ValueError(f"no readable image in {root}: nothing to shard")
    index = {"__kind__": INDEX_KIND, "wids_version": 1, "name": name, "shardlist": shardlist,
             "classes": listing.classes, "class_counts": counts, "num_samples": sum(counts.values()),
             "skipped": len(skipped), "source": str(root.resolve())}
    write_json(out / f"{name}.json", index)
    return index
