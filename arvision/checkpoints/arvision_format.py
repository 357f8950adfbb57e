"""The arvision checkpoint directory: atomic writes, the ``arvision.json`` description, weights files.

A checkpoint is a directory holding ``model.safetensors`` (the model's state_dict), optionally ``ema.safetensors``
(EMA weights, same keys), and ``arvision.json``::

    {"format": "arvision", "format_version": 2, "family": "nepa_vit", "model": config.to_dict(), "preset": null}

``family`` names the registered model family (arvision.models.registry) whose class rebuilds the weights; a
version-1 file has no ``family`` and holds a ``nepa_vit``. Trainer checkpoints add files (state.pt) that are
ignored here. Every write goes to a temporary sibling directory, is fsynced and renamed into place.

    save_model(model, "ckpt", preset="nepa_tiny_patch4_32")       # any registered family
    with atomic_directory("out") as tmp:                          # several files appear together, or none
        (tmp / "a.txt").write_text("...")
    family, config, preset = read_meta(Path("ckpt/arvision.json"))
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
from safetensors.torch import save_file

from ..files import command_line_error, is_disk_full, read_json, read_safetensors, read_torch_file
from ..models.registry import family_of, get_family, list_families, unwrap

FORMAT = "arvision"
FORMAT_VERSION = 2  # 2: "family" added; 1 held only nepa_vit
META_FILE = "arvision.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
LEGACY_FAMILY = "nepa_vit"

PathLike = Union[str, os.PathLike]
StateDict = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ writing

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(directory: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory to write into; on success it is fsynced and renamed to
    ``directory`` (replacing an existing one only then); on failure it is removed and nothing changes."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another checkpoint path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        try:
            yield tmp
        except Exception as e:
            if is_disk_full(e, tmp):
                raise OSError(errno.ENOSPC, f"No space left on device while writing {target} (the partial copy is "
                              f"removed, nothing else changed): free space under {target.parent} and run again; a "
                              "training run continues from its last checkpoint with --resume") from None
            raise
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def tensors(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Detached, contiguous CPU copies: what safetensors writes."""
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def write_safetensors(sd: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file(tensors(sd), str(path), metadata={"format": "pt"})


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save_model(model: torch.nn.Module, directory: PathLike,
               ema_state_dict: Optional[Mapping[str, torch.Tensor]] = None, preset: Optional[str] = None,
               extra_files: Optional[Callable[[Path], None]] = None,
               state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Write a model of any registered family as an arvision checkpoint directory, atomically; returns its path.

    ``extra_files(tmp_dir)`` may add more files (e.g. a trainer's state.pt) that then appear together with the
    weights. ``state_dict`` replaces ``model.state_dict()`` (e.g. the gathered full state of a sharded model)."""
    model = unwrap(model)
    family = family_of(model)
    config = model.config.to_dict()
    target = Path(directory)
    with atomic_directory(target) as tmp:
        write_safetensors(state_dict if state_dict is not None else model.state_dict(), tmp / WEIGHTS_FILE)
        if ema_state_dict is not None:
            write_safetensors(ema_state_dict, tmp / EMA_FILE)
        write_json(tmp / META_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION, "family": family,
                                     "model": config, "preset": preset})
        if extra_files is not None:
            extra_files(tmp)
    return target


# ------------------------------------------------------------------------------------------------ reading

def read_weights_file(path: Path) -> StateDict:
    """A state dict on the CPU from ``.safetensors``, a torch ``.bin``/``.pt`` (``weights_only``: no pickled code
    runs), or a sharded Hugging Face ``*.index.json``."""
    if path.name.endswith(".index.json"):
        index = read_json(path)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{path} has no 'weight_map'; a sharded checkpoint index maps each tensor to its file")
        shards = sorted(set(index["weight_map"].values()))
        sd: StateDict = {}
        for shard in shards:
            sd.update(read_weights_file(path.parent / shard))
        return sd
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return read_torch_file(path)
    raise ValueError(f"unsupported weights file {path}; expected .safetensors, .bin or a sharded *.index.json")


def read_meta(path: Path) -> tuple[str, Any, Optional[str]]:
    """(family, config dataclass, preset) of an ``arvision.json``."""
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise ValueError(f"{path} is not an arvision checkpoint description (format {meta.get('format')!r})")
    version = meta["format_version"]
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}, newer than this arvision ({FORMAT_VERSION}); "
                         "upgrade arvision")
    family = meta.get("family", LEGACY_FAMILY) if version == 1 else meta.get("family")
    if not isinstance(family, str):
        raise ValueError(f"{path} (format_version {version}) names no model family; the file is damaged or "
                         "hand-written: add \"family\": \"<name>\" (e.g. \"nepa_vit\")")
    if family not in list_families():
        raise ValueError(f"{path} holds a {family!r} model, a family this arvision does not know (known: "
                         f"{', '.join(list_families())}); import the module that registers it, or upgrade arvision")
    return family, get_family(family).config_cls.from_dict(meta["model"]), meta.get("preset")


def arvision_weights(directory: Path, ema: bool) -> Path:
    """The weights file of an arvision checkpoint directory (``ema``: the EMA copy)."""
    weights = directory / (EMA_FILE if ema else WEIGHTS_FILE)
    if not weights.is_file():
        hint = "it was saved without EMA weights; load it without ema=True" if ema else "incomplete save?"
        error = FileNotFoundError(f"no {weights.name} in arvision checkpoint {directory} ({hint})")
        raise command_line_error(error, f"no {weights.name} in arvision checkpoint {directory} (" + (
            "it was saved without EMA weights; drop --ema" if ema else hint) + ")")
    return weights
