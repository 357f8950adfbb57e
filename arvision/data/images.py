"""Reading and listing image files, for every reader in arvision (training folders, probes, the token cache,
segmentation images, `eval fid` folders, the visualiser and the predict commands).

    image = open_rgb("scan.png")                 # any mode Pillow opens -> 8-bit RGB by the mode's value range
    files = list_files(root, IMG_EXTENSIONS)     # sorted; hidden names skipped; links not followed (counted in the log)
    classes = class_folders(root)                # sorted non-hidden real sub-folders

Value ranges: 16-bit modes (``I;16*``, and ``I``, in which Pillow opens 16-bit PGM / PPM files) are 0..65535, ``F`` is
0..1, both clipped and scaled to 0..255; an alpha channel is dropped, as torchvision's and pytorch-fid's
``convert("RGB")`` do; every other mode (1, L, P, LA, PA, RGBA, RGBa, CMYK, YCbCr, ...) is Pillow's conversion.
Names starting with "." (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.jpg``) are never data. Symbolic links inside a
data folder are not followed: a link to something inside it names a file that is already listed under its own path
(or loops back), and a link that leads outside it would bring in files of another split or folder.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO, Sequence, Union

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

logger = logging.getLogger("arvision.data")

__all__ = ["IMG_EXTENSIONS", "class_folders", "is_hidden", "list_files", "open_rgb", "to_rgb"]


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit RGB image, scaled by its mode's value range (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "I" or mode.startswith("I;16"):
        full = 65535
    elif mode == "F":
        full = 1
    else:
        if mode in ("P", "PA") and "transparency" in image.info:
            image = image.convert("RGBA")  # Pillow's path for palette transparency; the alpha is then dropped
        elif mode == "La":
            image = image.convert("LA")
        return image.convert("RGB")
    values = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float64)), 0, full)
    grey = np.rint(values * (255 / full)).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def open_rgb(source: Union[str, os.PathLike, IO[bytes]]) -> Image.Image:
    """The image at ``source`` (a path or a binary file object), decoded now, as 8-bit RGB (``to_rgb``)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return open_rgb(f)
    image = Image.open(source)
    image.load()
    return to_rgb(image)


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def class_folders(root: Union[str, os.PathLike]) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``root`` that are real folders (not links)."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries
                      if not is_hidden(e.name) and not e.is_symlink() and e.is_dir(follow_symlinks=False))


def list_files(root: Union[str, os.PathLike], extensions: Sequence[str] = IMG_EXTENSIONS) -> list[Path]:
    """Files under ``root`` (recursively) whose names end with one of ``extensions`` (any case), ordered as
    torchvision's ImageFolder orders them (by folder, then name). Hidden names are skipped; links are not followed,
    and the skipped ones are counted in one log warning."""
    root = Path(root)
    real_root = os.path.realpath(root)
    suffixes = tuple(e.lower() for e in extensions)
    files: list[Path] = []
    outside = inside = broken = 0
    pending = [root]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if is_hidden(entry.name):
                    continue
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if not os.path.exists(target):
                        broken += 1
                    elif os.path.commonpath([real_root, target]) == real_root:
                        inside += 1
                    else:
                        outside += 1
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.name.lower().endswith(suffixes) and entry.is_file(follow_symlinks=False):
                    files.append(Path(entry.path))
    skipped = outside + inside + broken
    if skipped:
        logger.warning(
            "skipped %d symbolic link%s under %s (%d leading outside it, %d to files or folders inside it, which are "
            "listed under their own names or loop back, %d broken): links in a data folder are not followed, so each "
            "file is read once and no other split comes in", skipped, "" if skipped == 1 else "s", root, outside,
            inside, broken)
    return sorted(files, key=lambda p: (p.parent.parts, p.name))
