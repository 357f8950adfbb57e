"""Token cache: a dataset encoded once by a tokenizer, so generator training never re-runs it. This module reads
and checks a cache; ``token_cache_writer.build_token_cache`` (or `arvision tokenizer encode`) writes one.

    stats = build_token_cache(tok, "/data/cifar10", "cache/c10", img_size=32)     # token_cache_writer
    cache = TokenCache("cache/c10")                  # a Dataset of (tokens, label)
    tokens, label = cache[0]      # VQ: codes (N,) long;  KL: scale_factor * posterior sample (N, C) float32
    cache.info                    # the header: token_type, grid_size, codebook_size / latent_channels, num_classes...
    tok = cache.load_tokenizer()  # the tokenizer the cache was encoded with (a copy is kept in the cache)

Layout of a cache directory (tokens in raster order, N = grid_size ** 2):
    header.json    format, tokenizer family / codebook size / latent channels / grid / scale factor, source, classes,
                   counts (images, skipped), "encoded" (rows written so far) and "complete"
    tokens.npy     VQ: codes (num_images, copies, N) int16/int32;  KL: posterior moments (num_images, copies, N, 2C)
                   float32 (mean then log-variance, as MAR caches them, so training samples the posterior)
    labels.npy     (num_images,) int64;  valid.npy (num_images,) uint8: 0 for images that failed to decode
    tokenizer/     the tokenizer as an arvision checkpoint
    done.npy       while encoding only: (num_images,) uint8, 1 for each row written
Copy 0 is the centre-cropped image, copy 1 its horizontal mirror (LlamaGen / MAR cache both); with ``ten_crop``
(LlamaGen's ``--ten-crop``) copies 0-9 are the centre, top-left, top-right, bottom-left and bottom-right crops of a
``crop_range`` times larger centre crop, each followed by its mirror. Reading picks a copy at random per access
(``flip=True``), which is the augmentation. Arrays are numpy ``.npy`` files opened with ``mmap_mode="r"``.

Writing (``token_cache_writer``) is interruptible and resumable; ``complete`` is set only after every row is
written, and TokenCache refuses an incomplete cache.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch.utils.data import Dataset

FORMAT = "arvision-token-cache"
VERSION = 1
HEADER, TOKENS, LABELS, VALID, TOKENIZER_DIR = "header.json", "tokens.npy", "labels.npy", "valid.npy", "tokenizer"
DONE = "done.npy"  # while encoding: 1 for each row written (deleted once the cache is complete)
PathLike = Union[str, os.PathLike]


def read_header(path: PathLike) -> dict:
    path = Path(path)
    file = path / HEADER
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a token cache (no {HEADER}); make one with `arvision tokenizer encode "
                                "--data DIR --tokenizer TOK --out CACHE`")
    try:
        header = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): the header is damaged; re-encode the cache with "
                         "`arvision tokenizer encode`") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{file} is not an arvision token cache header (format "
                         f"{header.get('format') if isinstance(header, dict) else None!r})")
    return header


class TokenCache(Dataset):
    """Dataset of (tokens, label) read from a complete cache (memory-mapped)."""

    def __init__(self, path: PathLike, flip: bool = True, sample: bool = True):
        self.path = Path(path)
        self.info = read_header(self.path)
        if not self.info.get("complete"):
            raise ValueError(f"token cache {self.path} is incomplete ({self.info.get('encoded', 0)}/"
                             f"{self.info['num_images']} images encoded); rerun the same `arvision tokenizer encode` "
                             "to resume it")
        self.flip, self.sample = flip, sample
        self.tokens, self.labels, valid = (self._array(name) for name in (TOKENS, LABELS, VALID))
        self._check(valid)
        self.index = np.flatnonzero(valid)

    def _refuse(self, problem: str) -> ValueError:
        return ValueError(f"token cache {self.path}: {problem}; the header and the arrays disagree (edited, damaged "
                          "or from different encodes): delete it and encode again with `arvision tokenizer encode`")

    def _array(self, name: str) -> np.ndarray:
        try:
            return np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise self._refuse(f"{name} is missing") from None
        except (ValueError, OSError, EOFError) as e:
            raise self._refuse(f"{name} is not a readable .npy array ({str(e).splitlines()[0][:120]})") from None

    def _field(self, name: str, minimum: int = 0) -> int:
        value = self.info.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._refuse(f"header field {name}={value!r} is not an integer >= {minimum}")
        return value

    def _check(self, valid: np.ndarray) -> None:
        """The header against the arrays: token type, dtypes, shapes, counts, label and code ranges (one line naming
        the field that disagrees). Codes are scanned in chunks of rows, so a large cache is never read at once."""
        info, tokens, labels = self.info, self.tokens, self.labels
        token_type = info.get("token_type")
        if token_type not in ("discrete", "continuous"):
            raise self._refuse(f"header field token_type={token_type!r} is neither 'discrete' nor 'continuous'")
        n, copies, grid = self._field("num_images"), self._field("copies", 1), self._field("grid_size", 1)
        encoded, skipped, num_classes = self._field("encoded"), self._field("skipped"), self._field("num_classes", 1)
        if encoded != n:
            raise self._refuse(f"header says complete but encoded={encoded} of num_images={n} images")
        discrete = token_type == "discrete"
        width = self._field("codebook_size", 1) if discrete else 2 * self._field("latent_channels", 1)
        kind = "codes (integer, num_images x copies x tokens)" if discrete else \
            "moments (float, num_images x copies x tokens x 2*latent_channels)"
        if tokens.ndim != (3 if discrete else 4) or tokens.dtype.kind not in ("iu" if discrete else "f"):
            raise self._refuse(f"header field token_type={token_type!r} expects {kind} in {TOKENS}, which holds "
                               f"{tokens.dtype} {tuple(tokens.shape)}")
        if info.get("dtype") not in (None, tokens.dtype.name):
            raise self._refuse(f"header field dtype={info['dtype']!r} but {TOKENS} holds {tokens.dtype.name}")
        if tokens.shape[0] != n:
            raise self._refuse(f"header field num_images={n} but {TOKENS} holds {tokens.shape[0]} rows")
        if tokens.shape[1] != copies:
            raise self._refuse(f"header field copies={copies} but {TOKENS} holds {tokens.shape[1]} per image")
        if tokens.shape[2] != grid * grid:
            side = int(round(tokens.shape[2] ** 0.5))
            found = f"grid {side}" if side * side == tokens.shape[2] else "not a square grid"
            raise self._refuse(f"header field grid_size={grid} ({grid * grid} tokens per image) but {TOKENS} holds "
                               f"{tokens.shape[2]} per image ({found})")
        if not discrete and tokens.shape[3] != width:
            raise self._refuse(f"header field latent_channels={width // 2} but {TOKENS} holds {tokens.shape[3]} "
                               f"moments per token (2 x {tokens.shape[3] // 2} channels)")
        if not discrete and not (isinstance(info.get("scale_factor"), (int, float)) and
                                 np.isfinite(info["scale_factor"]) and info["scale_factor"] > 0):
            raise self._refuse(f"header field scale_factor={info.get('scale_factor')!r} is not a positive number")
        classes = info.get("classes") or []
        if classes and len(classes) != num_classes:
            raise self._refuse(f"header field num_classes={num_classes} but it lists {len(classes)} class names")
        for name, arr, kinds in ((LABELS, labels, "iu"), (VALID, valid, "bu")):
            if arr.shape != (n,) or arr.dtype.kind not in kinds:
                raise self._refuse(f"{name} is {arr.dtype} {tuple(arr.shape)}, expected one "
                                   f"{'integer label' if name == LABELS else 'uint8 flag'} per image "
                                   f"(num_images={n})")
        valid = np.asarray(valid)
        if valid.size and valid.max() > 1:
            raise self._refuse(f"{VALID} holds {int(valid.max())}; its flags are 0 (unreadable image) or 1")
        unreadable = n - int(np.count_nonzero(valid))
        if unreadable != skipped:
            raise self._refuse(f"{VALID} marks {unreadable} of {n} images unencoded or unreadable but the header "
                               f"field skipped={skipped}")
        if unreadable == n:
            raise self._refuse(f"{VALID} marks none of its {n} images readable")
        used = np.asarray(labels)[valid.astype(bool)]
        if used.min() < 0 or used.max() >= num_classes:
            bad = int(used.min() if used.min() < 0 else used.max())
            raise self._refuse(f"{LABELS} holds label {bad}, outside 0..{num_classes - 1} (header field "
                               f"num_classes={num_classes})")
        if discrete:
            rows = max(1, (64 << 20) // max(1, tokens[0].nbytes))
            for start in range(0, n, rows):
                block = np.asarray(tokens[start:start + rows])[valid[start:start + rows].astype(bool)]
                if block.size and (block.min() < 0 or block.max() >= width):
                    bad = int(block.min() if block.min() < 0 else block.max())
                    raise self._refuse(f"{TOKENS} holds code {bad}, outside 0..{width - 1} (header field "
                                       f"codebook_size={width})")

    def generator_fields(self) -> dict:
        """The model config a generator of these tokens must have: token type, grid, classes, and codebook size
        (codes) or latent channels (latents)."""
        info = self.info
        fields = dict(grid_size=info["grid_size"], num_classes=info["num_classes"], token_type=info["token_type"])
        if info["token_type"] == "discrete":
            fields["codebook_size"] = info["codebook_size"]
        else:
            fields["latent_channels"] = info["latent_channels"]
        return fields

    @property
    def scale_factor(self) -> float:
        return float(self.info["scale_factor"])

    @property
    def token_type(self) -> str:
        return self.info["token_type"]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        row = int(self.index[i])
        copy = int(torch.randint(self.tokens.shape[1], ())) if self.flip else 0
        t = torch.from_numpy(np.array(self.tokens[row, copy]))
        label = torch.tensor(int(self.labels[row]))
        if self.token_type == "discrete":
            return t.long(), label
        mean, logvar = t.chunk(2, dim=-1)
        if self.sample:
            mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mean)
        return mean * self.scale_factor, label

    def grids(self, copy: int = 0) -> torch.Tensor:
        """All valid token grids of one copy: codes (M, h, w) or posterior means (M, C, h, w)."""
        g = self.info["grid_size"]
        t = torch.from_numpy(np.array(self.tokens[self.index, copy]))
        if self.token_type == "discrete":
            return t.long().view(-1, g, g)
        return t[..., : t.shape[-1] // 2].view(-1, g, g, t.shape[-1] // 2).permute(0, 3, 1, 2).contiguous()

    def load_tokenizer(self):
        from ..checkpoints import load_tokenizer
        return load_tokenizer(self.path / TOKENIZER_DIR)
