"""NEPA attention and embedding-similarity maps for a query patch (the paper's figures; nepa_spec.md §7).

    images = load_images(["dog.jpg"], model.config.img_size)
    visualize(model, images, ["center", (3, 5)], "out/", layers="all")   # -> [out/image0_grid.png]

Attention map: the query token's attention row, averaged over the chosen blocks, reduced over heads, CLS column dropped.
Similarity map: softmax over patches of cos(final-norm output at the query, raw patch embedding), i.e. where the model's
prediction of the next patch points in the embedding space.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..models.transformer import parse_blocks

Query = tuple[int, int]
LayerSpec = Union[str, int, Sequence[int]]
QuerySpec = Union[str, Query, Sequence[Union[str, Query]]]

MEAN = STD = 0.5  # the HF processor normalisation of the official checkpoints
GAMMA_ATTENTION, GAMMA_SIMILARITY = 0.25, 10.0
OVERLAY_ALPHA = 0.55
NEAR_ZERO = 1e-6  # map values at or below this are shown as 0 (e.g. masked future patches under causal attention)
DISPLAY_FLOOR = 0.05  # the smallest kept value is shown at this level, so it stays distinct from the zeros


def parse_queries(spec: QuerySpec, grid_size: int, seed: int = 0) -> list[Query]:
    """Query patches (row, col) from "center", "random" (seeded), "r,c", an (r, c) pair or a list of these."""
    if isinstance(spec, (str, tuple)) or (isinstance(spec, list) and len(spec) == 2
                                          and all(isinstance(v, int) for v in spec)):
        spec = [spec]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for item in spec:
        for part in item.split(";") if isinstance(item, str) else [item]:
            if isinstance(part, str) and part.strip().lower() in ("center", "centre"):
                q = (grid_size // 2, grid_size // 2)
            elif isinstance(part, str) and part.strip().lower() == "random":
                q = tuple(torch.randint(grid_size, (2,), generator=gen).tolist())
            else:
                try:
                    q = tuple(int(v) for v in (part.split(",") if isinstance(part, str) else part))
                except (TypeError, ValueError):
                    q = ()
                if len(q) != 2:
                    raise ValueError(f"query {part!r} is not 'center', 'random' or a patch 'row,col'")
            if not all(0 <= v < grid_size for v in q):
                raise ValueError(f"query patch {q} is outside the {grid_size}x{grid_size} patch grid")
            out.append(q)
    if not out:
        raise ValueError("no query patch given; use 'center', 'random' or 'row,col'")
    return out


def load_images(paths: Sequence[Union[str, Path]], img_size: int) -> torch.Tensor:
    """(B, 3, S, S) images: square bilinear resize (as the HF processor), normalised with mean = std = 0.5."""
    from PIL import Image, UnidentifiedImageError

    from ..data.images import open_rgb

    if not paths:
        raise ValueError("no image paths given")
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"image file {p} does not exist")
        try:
            im = open_rgb(p).resize((img_size, img_size), Image.BILINEAR)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {p} ({e}); give a PNG/JPEG file") from e
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - MEAN) / STD)
    return torch.stack(out)


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode (no RoPE augmentation, no drop path) for the duration, then the previous mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _attention(model, images, layers: LayerSpec, head_reduce: str, causal: Optional[bool]) -> torch.Tensor:
    """Layer-averaged, head-reduced attention probabilities (B, T, T)."""
    if head_reduce not in ("mean", "max"):
        raise ValueError(f"head_reduce must be 'mean' or 'max', got {head_reduce!r}")
    with _eval_mode(model), torch.no_grad():
        maps = model.attention_maps(images, parse_blocks(layers, len(model.blocks)), causal)
    attn = torch.stack(list(maps.values())).float().mean(0)  # (B, H, T, T)
    return attn.mean(1) if head_reduce == "mean" else attn.amax(1)


def _token(model, query: Query) -> int:
    r, c = parse_queries([tuple(query)], model.grid_size)[0]
    return model.num_prefix_tokens + model.grid_size * r + c


def _attention_grid(model, attn: torch.Tensor, query: Query) -> torch.Tensor:
    G, P = model.grid_size, model.num_prefix_tokens
    return attn[:, _token(model, query), P:].reshape(-1, G, G)


def query_attention_map(model, images: torch.Tensor, query: Query, layers: LayerSpec = "all",
                        head_reduce: str = "mean", causal: Optional[bool] = None) -> torch.Tensor:
    """(B, G, G) attention of query patch (r, c) to every patch (the CLS column dropped)."""
    return _attention_grid(model, _attention(model, images, layers, head_reduce, causal), query)


def _similarity_grid(model, feats: torch.Tensor, embeds: torch.Tensor, query: Query, temperature: float,
                     top_p: float) -> torch.Tensor:
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    h = feats[:, _token(model, query)]
    cos = F.cosine_similarity(h[:, None].float(), embeds.float(), dim=-1)  # (B, N)
    probs = (cos / temperature).softmax(-1)
    if top_p < 1:  # keep the smallest set of patches whose mass reaches top_p (always at least the top one)
        sorted_p, order = probs.sort(-1, descending=True)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs.reshape(-1, model.grid_size, model.grid_size)


def _features(model, images, causal: Optional[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    with _eval_mode(model), torch.no_grad():
        return model.forward_features(images, causal), model.embed(images)[:, model.num_prefix_tokens:]


def embedding_similarity_map(model, images: torch.Tensor, query: Query, temperature: float = 1.0, top_p: float = 1.0,
                             causal: Optional[bool] = None) -> torch.Tensor:
    """(B, G, G) softmax over patches of cos(prediction at the query, raw patch embedding); sums to 1 per image."""
    return _similarity_grid(model, *_features(model, images, causal), query, temperature, top_p)


def query_maps(model, images: torch.Tensor, queries: Sequence[Query], layers: LayerSpec = "all",
               head_reduce: str = "mean", causal: Optional[bool] = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """What ``visualize`` draws, from one forward pass per kind: for each query patch, the (B, G, G) attention maps
    and the (B, G, G) embedding-similarity maps of every image."""
    attn = _attention(model, images, layers, head_reduce, causal)
    feats, embeds = _features(model, images, causal)
    return ([_attention_grid(model, attn, q).cpu().numpy() for q in queries],
            [_similarity_grid(model, feats, embeds, q, 1.0, 1.0).cpu().numpy() for q in queries])


def display_map(m: np.ndarray, gamma: float) -> np.ndarray:
    """Official display scaling: near-zero values stay 0, the rest are min-max mapped to [floor, 1], then ** gamma."""
    m = np.asarray(m, dtype=np.float64)
    out = np.zeros_like(m)
    keep = m > NEAR_ZERO
    if keep.any():
        lo, hi = m[keep].min(), m[keep].max()
        scaled = (m[keep] - lo) / (hi - lo) if hi > lo else np.ones(keep.sum())
        out[keep] = (DISPLAY_FLOOR + (1 - DISPLAY_FLOOR) * scaled) ** gamma
    return out


def save_query_grid(path: Path, image: torch.Tensor, rows: list[tuple[Query, np.ndarray, np.ndarray]], patch: int):
    """One image's PNG: a row per (query, attention map, similarity map); columns: the input with the query box,
    the attention overlay, the similarity overlay."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rgb = (image.float().cpu().permute(1, 2, 0) * STD + MEAN).clamp(0, 1).numpy()
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for ax_row, ((r, c), att, sim) in zip(axes, rows):
        panels = [(None, None, f"query ({r}, {c})"), (att, GAMMA_ATTENTION, "attention"),
                  (sim, GAMMA_SIMILARITY, "embedding similarity")]
        for ax, (m, gamma, title) in zip(ax_row, panels):
            ax.imshow(rgb, interpolation="nearest")
            if m is not None:
                heat = np.kron(display_map(m, gamma), np.ones((patch, patch)))  # one block per patch
                ax.imshow(heat, cmap="jet", alpha=OVERLAY_ALPHA, vmin=0, vmax=1, interpolation="nearest")
            ax.add_patch(Rectangle((c * patch - 0.5, r * patch - 0.5), patch, patch, fill=False, linewidth=2,
                                   edgecolor="red" if m is None else "white"))
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def visualize(model, images: torch.Tensor, queries: QuerySpec, out_dir: Union[str, Path], layers: LayerSpec = "all",
              head_reduce: str = "mean", names: Optional[Sequence[str]] = None, causal: Optional[bool] = None,
              seed: int = 0) -> list[Path]:
    """Write <name>_grid.png per image (rows: queries; columns: input with query box, attention, similarity)
    and visualize.json (queries, layers); returns the PNG paths."""
    names = [f"image{i}" for i in range(len(images))] if names is None else list(names)
    if len(names) != len(images) or len(set(names)) != len(names):
        raise ValueError(f"need {len(images)} distinct names for {len(images)} images, got {names}")
    qs = parse_queries(queries, model.grid_size, seed)
    block_ids = parse_blocks(layers, len(model.blocks))
    att_maps, sim_maps = query_maps(model, images, qs, block_ids, head_reduce, causal)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patch = model.config.patch_size
    paths = []
    for b, name in enumerate(names):
        path = out / f"{name}_grid.png"
        save_query_grid(path, images[b], [(q, a[b], s[b]) for q, a, s in zip(qs, att_maps, sim_maps)], patch)
        paths.append(path)
    meta = {"queries": [list(q) for q in qs], "layers": block_ids, "head_reduce": head_reduce,
            "causal": model.config.causal if causal is None else causal, "images": names}
    (out / "visualize.json").write_text(json.dumps(meta, indent=1))
    return paths
