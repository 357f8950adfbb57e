"""Reading the files arvision is given (weights, training state, recipes) and writing checkpoints, with one-line
errors that name the file and say what to do. Every layer reads through these, so no loader shows a library's
traceback, and none unpickles code: ``torch.load`` runs only with ``weights_only=True``, YAML only with safe_load.

    sd = read_safetensors(path)                       # FileFormatError: truncated / damaged
    obj = read_torch_file(path)                       # FileFormatError: refused pickle (names the global), damaged
    meta = read_json(path)                            # FileFormatError: damaged JSON
    cfg = read_yaml_text(text, source=path)           # FileFormatError: !!python tags, syntax errors (with the line)
    if is_disk_full(error, directory): ...            # an exception from a write that ran out of space
    raise command_line_error(ValueError("... ema=True ..."), "... --ema ...")  # each reader's own hint
    write_json(path, obj)                             # atomically: a temporary file beside it, then a rename
    write_image_npz(path, images, labels)             # ADM's sample layout (arr_0 uint8 NHWC, arr_1 labels)
    with atomic_write(path, suffix=".png") as tmp:    # any other writer: tmp becomes path when the block ends
        image.save(tmp)

``FileFormatError`` is a ``ValueError``, so the command line prints it as ``arvision: error: <message>``.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


class FileFormatError(ValueError):
    """A file that exists but cannot be read as what it should be: truncated, damaged, of another format, or holding
    something arvision refuses to load (pickled code, Python-object YAML tags)."""


def command_line_error(error: BaseException, message: str) -> BaseException:
    """``error`` carrying the line the command line prints instead of its own message (``arvision: error: ...``):
    for a fault that a Python caller and a command-line user fix differently (a keyword argument there, a flag or a
    command here). Raise what it returns."""
    error.command_line_message = message
    return error


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:160] if lines else type(error).__name__


def read_safetensors(path: PathLike, device: str = "cpu") -> dict:
    """The tensors of a ``.safetensors`` file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: the file itself is bad
        raise FileFormatError(f"{path} is truncated or damaged ({_first_line(e)}); copy or download it again, or "
                              "save it again from its source") from None


def read_torch_file(path: PathLike, safe_globals: Iterable[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU. A file that would unpickle anything beyond tensors and
    plain containers (plus ``safe_globals``) is refused, naming what it holds; it is never loaded otherwise."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused or "Weights only load failed" in str(e):
            what = f"a pickled Python object ({refused.group(1)})" if refused else "pickled Python objects"
            raise FileFormatError(
                f"{path} holds {what} that torch.load(weights_only=True) refuses, because unpickling it could run "
                "code; arvision loads tensors only: re-save just the state dict (torch.save(model.state_dict()) or "
                "safetensors) where the file came from") from None
        raise FileFormatError(f"{path} is truncated or damaged ({_first_line(e)}); copy it again or re-create "
                              "it") from None
    except Exception as e:  # noqa: BLE001 - zip / EOF / key errors of a bad file
        raise FileFormatError(f"{path} is truncated, damaged or not a torch file ({_first_line(e)}); copy it again "
                              "or re-create it") from None


def read_yaml_text(text: str, source: PathLike) -> Any:
    """``yaml.safe_load`` of a recipe or run config; ``source`` names it in errors."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or _first_line(e)
        if "!!python" in str(e) or "tag:yaml.org,2002:python" in str(e):
            raise FileFormatError(f"{source}{where} uses a Python tag (!!python/...), which arvision never "
                                  "constructs; write plain YAML values (numbers, strings, lists, maps)") from None
        raise FileFormatError(f"{source}{where} is not valid YAML: {problem}") from None


def read_yaml(path: PathLike) -> Any:
    return read_yaml_text(Path(path).read_text(), path)


def read_json(path: PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path} is not valid JSON ({_first_line(e)}): the file is damaged or hand-edited; "
                              "restore it from its source") from None


def output_names(paths: Iterable[PathLike]) -> list[str]:
    """One distinct output name per input file: its stem, with as many parent folders as it takes to tell it from
    the others (cat/0000.jpg and ship/0000.jpg -> cat_0000, ship_0000), then its position if still equal."""
    parts = [Path(os.path.abspath(p)).with_suffix("").parts for p in paths]
    depth = [1] * len(parts)
    while True:
        names = ["_".join(p[-d:]).lstrip(os.sep) for p, d in zip(parts, depth)]
        sources: dict[str, set] = {}
        for n, p in zip(names, parts):
            sources.setdefault(n, set()).add(p)
        grow = [i for i, n in enumerate(names) if len(sources[n]) > 1 and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    if len(set(names)) < len(names):
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    return names


def is_disk_full(error: BaseException, directory: PathLike) -> bool:
    """Whether ``error``, raised by a write under ``directory``, means the device ran out of space (or quota). torch
    and safetensors lose the errno ('unexpected pos', 'os error 28'), so the device's free space decides for them."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "os error 28" in str(error) or "No space left" in str(error):
        return True
    if not isinstance(error, (OSError, RuntimeError)) and type(error).__name__ != "SafetensorError":
        return False
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


@contextmanager
def atomic_write(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary name beside ``path`` (same folder, so the rename is atomic) for the block to write; renamed onto
    ``path`` when the block ends, removed when it raises, so readers see the old file or the new one, never part of
    one. ``suffix`` ends the temporary name for writers that choose the format from it (PIL: ``.png``; ``np.savez``
    adds ``.npz`` to any other name). A process killed mid-write leaves ``.<name>.tmp-<pid>-...`` behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: PathLike, text: str, fsync: bool = False) -> Path:
    """``text`` written to ``path`` atomically (``atomic_write``); ``fsync``: on the disk before the rename."""
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_json(path: PathLike, obj: Any, indent: int = 2, default: Optional[Callable] = None,
               fsync: bool = False) -> Path:
    """``obj`` as JSON at ``path``, atomically (``write_text``)."""
    return write_text(path, json.dumps(obj, indent=indent, default=default), fsync)


def write_image_npz(path: PathLike, images, labels) -> Path:
    """uint8 images (N, H, W, 3) and their class labels (N,) as the ``.npz`` that ``arvision eval fid`` and the
    ADM/OpenAI evaluator read (``arr_0``, ``arr_1`` int64), atomically (``atomic_write``)."""
    import numpy as np

    images, labels = np.asarray(images), np.asarray(labels).astype(np.int64)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(labels) != len(images):
        raise ValueError(f"expected uint8 images (N, H, W, 3) and N labels, got {images.dtype} {images.shape} and "
                         f"{len(labels)} labels")
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images, arr_1=labels)
    return Path(path)
