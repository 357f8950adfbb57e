"""Writing samples: a PNG grid (one row per class) and the ADM-format ``.npz`` that ``arvision eval fid`` and the
ADM/OpenAI evaluator read (``arr_0``: uint8 (N, H, W, 3); ``arr_1``: int64 class labels). Both are written to a
temporary name and renamed, so an interrupted run never leaves a file that looks complete. Samples are drawn and
written in a seeded random class order (``class_labels``), never class by class.

    labels = class_labels(range(1000), 50, seed=0)
    images = generate_images(model, tokenizer, labels, SamplingConfig(), batch_size=64, seed=0)
    save_grid(images, labels, "samples.png", per_row=8, labelled=True)
    arvision.files.write_image_npz("samples.npz", images, labels)   # the .npz, written by the files layer
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ..files import atomic_write
from .sample import SamplingConfig, decode_tokens, sample_tokens, to_uint8


@torch.no_grad()
def generate_images(model, tokenizer, labels: torch.Tensor, config: Optional[SamplingConfig] = None,
                    batch_size: int = 64, seed: int = 0, scale_factor: float = 1.0,
                    progress: bool = True, first_index: int = 0) -> torch.Tensor:
    """uint8 images (N, H, W, 3) for ``labels``, sampled in batches; image i is sample ``first_index + i`` of
    ``seed`` (its randomness its own, see ``sample_tokens``), whatever the batch size."""
    out = []
    batches = range(0, labels.shape[0], batch_size)
    for start in tqdm(batches, desc="sampling", disable=not progress):
        batch = labels[start:start + batch_size]
        first = first_index + start
        tokens = sample_tokens(model, batch, config, seed=seed, indices=range(first, first + batch.shape[0]))
        images = decode_tokens(tokenizer, tokens, model.config, scale_factor)
        out.append(to_uint8(images))
    return torch.cat(out)


def class_labels(classes, num_per_class: int, seed: int = 0) -> torch.Tensor:
    """Each of ``classes`` ``num_per_class`` times, in a random order fixed by ``seed``: samples written in this
    order can be split or subset in file order (an Inception Score's splits, an external evaluator's first N) and
    each part still holds about every class."""
    labels = torch.as_tensor(list(classes), dtype=torch.long).repeat_interleave(num_per_class)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


LABEL_CHARS = 24  # longer row labels are cut, so a long class name cannot widen the grid without bound


def tile_images(rows: list, per_row: int, row_labels: Optional[Sequence[str]] = None) -> np.ndarray:
    """uint8 (H', W', 3) of ``rows`` (each uint8 (n, H, W, 3), up to ``per_row`` shown) with 2-pixel white gutters;
    ``row_labels`` (one text per row) adds a white column on the left with each row's text in PIL's default font."""
    H, W = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (H + 2), per_row * (W + 2), 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row[:per_row]):
            canvas[i * (H + 2):i * (H + 2) + H, j * (W + 2):j * (W + 2) + W] = np.asarray(img)
    if row_labels is None:
        return canvas
    if len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    return np.concatenate([_label_column(row_labels, H + 2, canvas.shape[0]), canvas], axis=1)


def _label_column(texts: Sequence[str], row_height: int, height: int) -> np.ndarray:
    """uint8 (height, w, 3): white, with texts[i] in black, right-aligned and centred on row i."""
    font = ImageFont.load_default()
    texts = [t if len(t) <= LABEL_CHARS else t[:LABEL_CHARS - 1] + "\u2026" for t in map(str, texts)]
    boxes = [font.getbbox(t) for t in texts]
    width = max(box[2] for box in boxes) + 8
    column = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(column)
    for i, (text, box) in enumerate(zip(texts, boxes)):
        top = i * row_height + (row_height - 2 - (box[3] + box[1])) // 2  # the glyphs' middle on the image's
        draw.text((width - 4 - box[2], top), text, fill="black", font=font)
    return np.asarray(column)


def row_label_texts(classes: Sequence[int], class_names: Optional[Sequence[str]] = None) -> list[str]:
    """A grid row's label: the class name where ``class_names`` (a token cache's ``classes``) has one, else the
    class index."""
    names = list(class_names or [])
    return [str(names[c]) if 0 <= c < len(names) and str(names[c]) else str(c) for c in map(int, classes)]


def class_grid(images: torch.Tensor, labels: torch.Tensor, per_row: Optional[int] = None, labelled: bool = False,
               class_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """One row per class (in label order), ``per_row`` samples each (default: as many as the rarest class);
    ``labelled``: each row named on the left (``row_label_texts``: the class name, else the index)."""
    classes = labels.unique().tolist()
    rows = [images[labels.cpu() == c] for c in classes]
    texts = row_label_texts(classes, class_names) if labelled else None
    return tile_images(rows, per_row or min(len(r) for r in rows), texts)


def save_image(canvas: np.ndarray, path) -> Path:
    """A uint8 (H, W, 3) array as a PNG, written atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path


def save_grid(images: torch.Tensor, labels: torch.Tensor, path, per_row: Optional[int] = None,
              labelled: bool = False, class_names: Optional[Sequence[str]] = None) -> Path:
    """``class_grid`` written to ``path``."""
    return save_image(class_grid(images, labels, per_row, labelled, class_names), path)
