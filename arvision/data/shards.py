"""WebDataset tar shards: reading them as an indexed dataset (``shard_writer.py`` writes them from an image folder).

    write_shards("/data/in1k", "/data/in1k-wds", "train")   # shard_writer: OUT/train-000000.tar ... + OUT/train.json
    build_dataset("/data/in1k-wds/train-{000000..000146}.tar", "train")   # or the folder "/data/in1k-wds"

A shard holds samples in the WebDataset layout: members ``<key>.<ext>`` (the image's original encoded bytes under its
lower-case extension) and ``<key>.cls`` (the class index as text), ``<key>`` = ``<class>/<stem>``. ``OUT/<split>.json``
is the split's index: a wids shard list (``__kind__: wids-shard-index-v1``, ``shardlist`` of ``{url, nsamples}``, so
``wids.ShardListDataset`` opens it too) plus the class names, the count of images per class and the images skipped.

Reading is map-style: each shard's tar headers are read once into arrays of (shard, offset, size,
label), and an image is one ``pread`` from an open shard. The Trainer's ``ResumableSampler`` therefore gives shards
exactly what it gives image folders: one global permutation per epoch, disjoint per-rank slices, loader workers
splitting the batches, and an exact resume (the same samples in the same order with the same augmentations). What
this does not give is sequential reading: each image is a random read inside a shard, which avoids the per-file
metadata cost of a million-file folder (the stall on network file systems) but relies on the shards' pages being
reachable by seek (a local disk, a page cache, or a parallel file system), not on a streaming object store.
"""
from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from ..files import read_json
from .datasets import SkipCorruptDataset
from .images import IMG_EXTENSIONS, open_rgb

logger = logging.getLogger("arvision.data")

INDEX_KIND = "wids-shard-index-v1"
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)
_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # WebDataset's key / extension split; hidden names never
_TAR_BLOCK = 512


def _webdataset():
    try:
        import webdataset
    except ImportError as e:
        raise ImportError("reading or writing WebDataset shards needs the `webdataset` package; install with: "
                          "pip install 'arvision[shards]'") from e
    return webdataset


# ------------------------------------------------------------------------------------------------ source names

def is_shard_source(source) -> bool:
    """A ``.tar`` path or brace pattern (``shards/train-{000000..000146}.tar``), or a folder holding ``.tar`` files
    and no split folder (an image folder beside its downloaded archives, ``ILSVRC2012_img_train.tar``, stays one)."""
    text = str(source)
    if text.endswith(".tar"):
        return True
    path = Path(text)
    return (path.is_dir() and any(name.endswith(".tar") for name in os.listdir(path))
            and not any((path / split).is_dir() for split in ("train", "val", "validation", "test")))


def shard_folder(source) -> Path:
    """The folder holding the shards and their ``<split>.json`` indexes."""
    path = Path(str(source))
    return path if not str(source).endswith(".tar") else path.parent


def _indexes(folder: Path) -> dict[str, dict]:
    """{split: index} of the shard indexes in ``folder`` (``<split>.json`` files of the wids kind)."""
    found = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        index = read_json(path)
        if isinstance(index, dict) and index.get("__kind__") == INDEX_KIND:
            found[path.stem] = index
    return found


def shard_splits(source) -> list[str]:
    """The split names of a shard source: its folder's ``<split>.json`` indexes."""
    folder = shard_folder(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"shard folder {folder} does not exist; pass a folder of shards written by "
                                "`arvision data shard` or a pattern such as 'shards/train-{000000..000009}.tar'")
    return sorted(_indexes(folder))


def _pattern_files(pattern: str) -> list[Path]:
    files = [Path(p) for p in _webdataset().shardlists.expand_urls(pattern)]
    missing = [p for p in files if not p.is_file()]
    if len(missing) == len(files):
        raise FileNotFoundError(f"the shard pattern {pattern} matches no file; check the folder and the brace range "
                                f"(e.g. 'train-{{000000..000009}}.tar' for 10 shards)")
    if missing:
        raise FileNotFoundError(f"shard {missing[0]} is missing ({len(missing)} of the {len(files)} shards of "
                                f"{pattern} are); copy it or narrow the brace range")
    return files


def _index_shards(folder: Path, split: str, index: dict) -> list[Path]:
    return [folder / entry["url"] for entry in index.get("shardlist", [])]


def open_shards(source, split: str, transform: Optional[Callable] = None) -> "ShardDataset":
    """The dataset of ``split`` of a shard source. A brace pattern's shards are read for the split whose index lists
    them; any other split is read whole from its index in the same folder (a pattern of train shards still finds
    ``val.json`` for evaluation)."""
    folder = shard_folder(source)
    indexes = _indexes(folder)
    if split not in indexes:
        raise FileNotFoundError(f"no shard index {folder / (split + '.json')} (indexes found: "
                                f"{', '.join(indexes) or 'none'}); write shards with `arvision data shard DIR OUT "
                                f"--split {split}`, which writes the index beside them")
    shards = _index_shards(folder, split, indexes[split])
    if str(source).endswith(".tar"):
        chosen = _pattern_files(str(source))
        owner = [s for s, index in indexes.items()
                 if {p.resolve() for p in chosen} <= {p.resolve() for p in _index_shards(folder, s, index)}]
        if not owner:
            raise ValueError(f"the shards of {source} are not all listed in one index of {folder} "
                             f"({', '.join(f'{s}.json' for s in indexes)}); name shards of one split")
        if split in owner:
            shards = chosen
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard {missing[0]} listed in {folder / (split + '.json')} is missing "
                                f"({len(missing)} of {len(shards)}); copy it or write the shards again")
    expected = {(folder / e["url"]).resolve(): e.get("nsamples") for e in indexes[split].get("shardlist", [])}
    return ShardDataset(shards, indexes[split].get("classes", []), transform, expected_counts=expected)


# ------------------------------------------------------------------------------------------------ reading

class _TarFormatError(ValueError):
    pass


def _tar_number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 (sizes of 8 GiB and more)
        return int.from_bytes(field[1:], "big", signed=field[:1] == b"\xff")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _tar_files(f) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file of the tar file object ``f``, from its 512-byte headers (ustar,
    GNU long names, pax path and size records): Python's ``tarfile`` makes an object per member and is ~10x slower,
    minutes for ImageNet's 1.28M images. Headers are checksummed as tarfile does."""
    offset, long_name, pax = 0, None, {}
    while True:
        f.seek(offset)
        header = f.read(_TAR_BLOCK)
        if len(header) < _TAR_BLOCK:
            if not header:
                return  # no end-of-archive blocks: tolerated, as tarfile does
            raise _TarFormatError(f"a header ends {len(header)} bytes into its 512 at byte {offset}")
        if header.count(0) == _TAR_BLOCK:
            return
        stored = _tar_number(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]) and stored != (  # unsigned, else signed bytes
                sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256):
            raise _TarFormatError(f"bad header checksum at byte {offset}")
        size, kind = _tar_number(header[124:136]), header[156:157]
        data = offset + _TAR_BLOCK
        offset = data + -(-size // _TAR_BLOCK) * _TAR_BLOCK
        if kind in (b"L", b"x", b"g"):
            f.seek(data)
            body = f.read(size)
            if len(body) < size:
                raise _TarFormatError(f"an extended header at byte {data} is cut short")
            if kind == b"L":
                long_name = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax_records(body)
            continue
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        name = pax.get("path") or long_name or name.decode("utf-8", "surrogateescape")
        if "size" in pax:
            size = int(pax["size"])
            offset = data + -(-size // _TAR_BLOCK) * _TAR_BLOCK
        if kind in (b"0", b"\0", b"7"):
            yield name, data, size
        long_name, pax = None, {}


def _pax_records(body: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(body) and body[pos:pos + 1] != b"\0":
        space = body.index(b" ", pos)
        length = int(body[pos:space])
        key, _, value = body[space + 1:pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _scan(path: Path, num_classes: int) -> tuple[list, list, list, list, list]:
    """(keys, offsets, sizes, labels, extensions) of the samples of one shard: its image member (the first one with
    an image extension) and its ``cls`` member (the label, -1 without one)."""
    keys, offsets, sizes, labels, exts = [], [], [], [], []
    current = None
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            for name, data, size in _tar_files(f):
                match = _MEMBER.match(name)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if key != current:
                    current = key
                    keys.append(key), offsets.append(-1), sizes.append(0), labels.append(-1), exts.append("")
                if ext in IMAGE_EXTS and offsets[-1] < 0:
                    offsets[-1], sizes[-1], exts[-1] = data, size, ext
                elif ext == "cls":
                    f.seek(data)
                    text = f.read(size).decode("utf-8", "replace").strip()
                    if not text.lstrip("-").isdigit() or not (0 <= int(text) < num_classes or not num_classes):
                        raise ValueError(f"sample {key} of shard {path} has class {text!r}, not an index into its "
                                         f"{num_classes} classes; write the shards again")
                    labels[-1] = int(text)
    except (_TarFormatError, EOFError) as e:
        raise ValueError(f"shard {path} is not a readable tar file ({e}); it may be truncated: copy it again") from e
    keep = [i for i, offset in enumerate(offsets) if offset >= 0]  # samples without an image are not samples
    return ([keys[i] for i in keep], [offsets[i] for i in keep], [sizes[i] for i in keep],
            [labels[i] for i in keep], [exts[i] for i in keep])


class ShardDataset(SkipCorruptDataset):
    """WebDataset tar shards as a map-style dataset (see the module docstring); ``classes`` from the shard index.
    An image that does not decode is skipped and counted as in image folders (``SkipCorruptDataset``)."""

    def __init__(self, shards: Sequence[str | os.PathLike], classes: Sequence[str], transform: Optional[Callable] = None,
                 expected_counts: Optional[dict] = None):
        self.shards, self.classes, self.transform = [Path(s) for s in shards], list(classes), transform
        shard_ids, offsets, sizes, labels, keys = [], [], [], [], []
        for shard_id, path in enumerate(self.shards):
            k, o, s, lab, _ = _scan(path, len(self.classes))
            expected = (expected_counts or {}).get(path.resolve())
            if expected is not None and expected != len(k):
                raise ValueError(f"shard {path} holds {len(k)} samples where its index lists {expected}; it is "
                                 "truncated or was replaced: copy it again or write the shards again")
            shard_ids += [shard_id] * len(k)
            offsets += o
            sizes += s
            labels += lab
            keys += k
        if not keys:
            raise FileNotFoundError(f"no images found in the shards {self.shards[0]} ... ({len(self.shards)} shards)")
        self._shard_of = np.asarray(shard_ids, dtype=np.int32)
        self._offset = np.asarray(offsets, dtype=np.int64)
        self._size = np.asarray(sizes, dtype=np.int64)
        self._keys = np.asarray([k.encode() for k in keys], dtype=np.bytes_)
        self.targets = labels
        self._files: dict[int, int] = {}
        self._pid = os.getpid()
        self._init_skipping(len(keys))

    def _fd(self, shard_id: int) -> int:
        if self._pid != os.getpid():  # a forked loader worker opens its own descriptors
            self._files, self._pid = {}, os.getpid()
        if shard_id not in self._files:
            self._files[shard_id] = os.open(self.shards[shard_id], os.O_RDONLY)
        return self._files[shard_id]

    def read_bytes(self, index: int) -> bytes:
        """The encoded image bytes of sample ``index``."""
        size = int(self._size[index])
        data = os.pread(self._fd(int(self._shard_of[index])), size, int(self._offset[index]))
        if len(data) != size:
            raise OSError(f"read {len(data)} of {size} bytes: the shard is truncated")
        return data

    def key(self, index: int) -> str:
        return self._keys[index].decode()

    def _load(self, index: int) -> tuple[Image.Image, int]:
        return open_rgb(io.BytesIO(self.read_bytes(index))), self.targets[index]

    def _describe(self, index: int) -> str:
        return f"{self.key(index)} in {self.shards[int(self._shard_of[index])]}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None  # descriptors stay with the process that opened them
        return state

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_files", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __repr__(self) -> str:
        return f"ShardDataset({len(self.shards)} shards from {self.shards[0].parent}, {len(self)} images)"
