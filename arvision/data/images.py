"""Reading and listing image files, for every reader in arvision (training folders, probes, the token cache,
segmentation images, `eval fid` folders, the visualiser and the predict commands).

    image = open_rgb("scan.png")                 # any mode Pillow opens -> 8-bit RGB by the mode's value range
    files = list_files(root, IMG_EXTENSIONS)     # sorted; hidden names skipped; links followed (see below)
    classes = class_folders(root)                # sorted non-hidden sub-folders, real or linked

Value ranges: 16-bit modes (``I;16*``, and ``I``, in which Pillow opens 16-bit PGM / PPM files) are 0..65535, ``F`` is
0..1, both clipped and scaled to 0..255; an alpha channel is dropped, as torchvision's and pytorch-fid's
``convert("RGB")`` do; every other mode (1, L, P, LA, PA, RGBA, RGBa, CMYK, YCbCr, ...) is Pillow's conversion.
Names starting with "." (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.jpg``) in a data folder are never data.
Symbolic links are followed wherever they lead (a subset made of links to class folders or files, git-annex / DataLad
files linked into ``.git/annex``, Hugging Face hub snapshot files linked into ``blobs/``: hidden names count only as
listed, not in link targets), but each real file is listed once, under its first name (its own name when it lies in
the folder listed). Skipped, and counted in one log warning: links that loop back to a folder being walked or above
it, second names of a file or folder already listed, links into the dataset root (the folder holding the train/ val/
test/ splits, when the caller gives one) outside the split being listed other than through a hidden name, and
dangling links.
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


_SKIP_REASONS = {  # reason -> how the log names it
    "loop": "looping back to a folder above",
    "listed": "naming a file or folder already listed",
    "split": "leading into another split of the dataset",
    "dangling": "dangling",
}


def _within(folder: str, path: str, *, through_hidden: bool = True) -> bool:
    """Whether real path ``path`` is ``folder`` or lies under it (through a hidden name only if ``through_hidden``)."""
    while path != folder:
        parent, name = os.path.split(path)
        if parent == path or (not through_hidden and is_hidden(name)):
            return False
        path = parent
    return True


class _LinkPolicy:
    """Which symbolic links a listing of ``root`` follows. ``dataset_root`` is the folder holding ``root`` and the
    other splits (``root`` itself when there is none). A link is skipped, and counted by reason, when it is dangling,
    when it leads to a folder above the one holding it or above ``root`` (a loop), when it leads to a folder or image
    the listing already reaches (``entered``: ``root`` and every folder a link was followed into, each walked through
    its non-hidden names), or when it leads into ``dataset_root`` outside ``root`` other than through a hidden name
    (another split; ``.git/annex`` is not one). Everything else is followed, wherever it leads: linked class folders,
    git-annex / DataLad files, Hugging Face hub snapshot files."""

    def __init__(self, root: Path, dataset_root: Union[str, os.PathLike, None], suffixes: tuple[str, ...]):
        self.real_root = os.path.realpath(root)
        zones = {os.path.realpath(dataset_root if dataset_root is not None else root)}
        if dataset_root is not None and Path(dataset_root) != root:
            zones.add(os.path.dirname(self.real_root))  # a split folder that is itself a link: its real siblings
        self.zones = [z for z in zones if z != self.real_root]
        self.suffixes = suffixes
        self.entered = {self.real_root}
        self.followed_files: set[str] = set()
        self.skipped: dict[str, int] = dict.fromkeys(_SKIP_REASONS, 0)

    def _reached(self, path: str) -> bool:
        """Whether the listing walks real path ``path``: it lies under an entered folder through non-hidden names."""
        while path not in self.entered:
            parent, name = os.path.split(path)
            if parent == path or is_hidden(name):
                return False
            path = parent
        return True

    def follow(self, link: str, real_parent: str) -> str | None:
        """The real path of what ``link`` (found in the folder whose real path is ``real_parent``) names, a folder to
        walk or an image to list, or None when it is skipped (counted) or names no image."""
        target = os.path.realpath(link)
        is_dir = os.path.isdir(target)
        if not is_dir and not os.path.isfile(target):
            if not os.path.exists(target):
                self.skipped["dangling"] += 1
            return None
        if not is_dir and not os.path.basename(link).lower().endswith(self.suffixes):
            return None
        if is_dir and (_within(target, real_parent) or _within(target, self.real_root)):
            reason = "loop"
        elif (self._reached(target) if is_dir else target in self.followed_files or (
                os.path.basename(target).lower().endswith(self.suffixes) and not is_hidden(os.path.basename(target))
                and self._reached(os.path.dirname(target)))):
            reason = "listed"
        elif not _within(self.real_root, target) and any(_within(z, target, through_hidden=False) for z in self.zones):
            reason = "split"
        else:
            (self.entered.add if is_dir else self.followed_files.add)(target)
            return target
        self.skipped[reason] += 1
        return None

    def report(self, root: Path) -> None:
        total = sum(self.skipped.values())
        if total:
            reasons = ", ".join(f"{n} {_SKIP_REASONS[r]}" for r, n in self.skipped.items() if n)
            logger.warning("skipped %d symbolic link%s under %s (%s): each real file is listed once, no loop is walked "
                           "and no other split comes in", total, "" if total == 1 else "s", root, reasons)


def class_folders(root: Union[str, os.PathLike], dataset_root: Union[str, os.PathLike, None] = None) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``root``, real ones and the links to folders that ``list_files``
    follows (not loops, second names or other splits of ``dataset_root``; see ``_LinkPolicy``)."""
    root = Path(root)
    policy = _LinkPolicy(root, dataset_root, ())
    with os.scandir(root) as scanned:
        entries = sorted((e for e in scanned if not is_hidden(e.name)), key=lambda e: e.name)
    names = [e.name for e in entries if not e.is_symlink() and e.is_dir(follow_symlinks=False)]
    names += [e.name for e in entries if e.is_symlink() and e.is_dir()
              and policy.follow(e.path, policy.real_root) is not None]
    return sorted(names)


def list_files(root: Union[str, os.PathLike], extensions: Sequence[str] = IMG_EXTENSIONS,
               dataset_root: Union[str, os.PathLike, None] = None) -> list[Path]:
    """Files under ``root`` (recursively) whose names end with one of ``extensions`` (any case), ordered as
    torchvision's ImageFolder orders them (by folder, then name), each under the name it has in ``root``. Hidden
    names are skipped. Symbolic links are followed, wherever they lead, except loops, second names of a file or
    folder already listed, links into ``dataset_root`` (the folder holding ``root`` and the other splits) outside
    ``root``, and dangling links: those are counted in one log warning (see ``_LinkPolicy``)."""
    root = Path(root)
    policy = _LinkPolicy(root, dataset_root, tuple(e.lower() for e in extensions))
    files: list[Path] = []
    walked: set[str] = set()
    links: list[tuple[str, str]] = []  # (link, real path of the folder holding it), followed after the real tree

    def walk(top: Path, real_top: str) -> None:
        pending = [(top, real_top)]
        while pending:
            folder, real_folder = pending.pop()
            if real_folder in walked:  # reached before through another followed link
                continue
            walked.add(real_folder)
            with os.scandir(folder) as scanned:
                entries = sorted((e for e in scanned if not is_hidden(e.name)), key=lambda e: e.name)
            for entry in entries:
                if entry.is_symlink():
                    links.append((entry.path, real_folder))
                elif entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), os.path.join(real_folder, entry.name)))
                elif entry.name.lower().endswith(policy.suffixes) and entry.is_file(follow_symlinks=False):
                    if os.path.join(real_folder, entry.name) in policy.followed_files:  # listed by a file link
                        policy.skipped["listed"] += 1
                    else:
                        files.append(Path(entry.path))

    walk(root, policy.real_root)
    followed = 0
    while followed < len(links):  # in the order found: the top folder's links (class folders) first
        link, real_parent = links[followed]
        followed += 1
        target = policy.follow(link, real_parent)
        if target is not None and os.path.isdir(target):
            walk(Path(link), target)
        elif target is not None:
            files.append(Path(link))
    policy.report(root)
    return sorted(files, key=lambda p: (p.parent.parts, p.name))
