"""2D rotary position embedding (RoPE) of the official NEPA code (the DINOv3 scheme).

Patch centres are placed on [-1, 1] per axis (y_i = 2 (i + 0.5) / H - 1, any H x W grid), each axis gets d/4 frequencies
``theta ** (-4k / d)``, and the per-token angle vector is laid out as [y, x, y, x] (d/4 each), so that
rotate-half pairs dimension j with j + d/2. Prefix tokens (CLS) are not rotated.

At train time the coordinates can be augmented (shift, then jitter, then rescale), with one draw per
forward call from torch's global generator, shared by the batch and by all layers (nepa_spec.md §1.3).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn


def patch_coordinates(grid_h: int, grid_w: Optional[int] = None) -> torch.Tensor:
    """(H*W, 2) patch-centre coordinates (y, x), each axis on [-1, 1] (y_i = 2 (i + 0.5) / H - 1), row-major.
    A larger or non-square grid (a segmentation crop) gets denser coordinates on the same range: no interpolation."""
    grid_w = grid_h if grid_w is None else grid_w
    ys = (torch.arange(grid_h, dtype=torch.float32) + 0.5) * (2.0 / grid_h) - 1.0
    xs = (torch.arange(grid_w, dtype=torch.float32) + 0.5) * (2.0 / grid_w) - 1.0
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], dim=-1)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, for ``apply_rope_signed``: rotate_half(x) * sin = roll(x, d/2) * signed_sin
    (the official x cos + rotate_half(x) sin is in tests/official_reference.py)."""
    h = sin.shape[-1] // 2
    return torch.cat((-sin[..., :h], sin[..., h:]), dim=-1)


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, d) by per-token angles (cos / sin tables 1 / 0 on unrotated tokens), with ``signed_sin(sin)``
    computed once per forward: x cos + roll(x, d/2) sin_signed, three kernels instead of the official five (no
    negation, the multiply-add fused); equal to the official ``apply_rope`` up to float rounding."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


Grid = Union[int, tuple[int, int]]


class Rope2D(nn.Module):
    """Produces the (T, d) cos/sin tables for one forward call; T = num_prefix_tokens + H*W.

    ``grid_size`` is the default grid; ``forward(grid=(H, W))`` gives tables for any other grid. Slice the tables
    (``cos[offset:offset + T]``) for a chunk of positions under a KV cache. In eval mode (no augmentation) the
    tables are cached per (grid, dtype, device)."""

    def __init__(
        self,
        head_dim: int,
        grid_size: Grid,
        theta: float = 100.0,
        num_prefix_tokens: int = 1,
        rescale: Optional[float] = None,
        shift: Optional[float] = None,
        jitter: Optional[float] = None,
    ):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.grid_size = _as_grid(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.rescale, self.shift, self.jitter = rescale, shift, jitter
        inv_freq = theta ** (-torch.arange(head_dim // 4, dtype=torch.float32) * 4.0 / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: dict = {}

    def augmented_coords(self, grid: Optional[Grid] = None) -> torch.Tensor:
        coords = patch_coordinates(*_as_grid(grid or self.grid_size)).to(self.inv_freq.device)
        if not self.training:
            return coords
        device = coords.device
        if self.shift:
            coords = coords + torch.empty(1, 2, device=device).uniform_(-self.shift, self.shift)
        if self.jitter:
            log_j = math.log(self.jitter)
            coords = coords * torch.empty(1, 2, device=device).uniform_(-log_j, log_j).exp()
        if self.rescale:
            log_r = math.log(self.rescale)
            coords = coords * torch.empty(1, 1, device=device).uniform_(-log_r, log_r).exp()
        return coords

    def forward(self, dtype: torch.dtype = torch.float32, grid: Optional[Grid] = None) -> tuple[torch.Tensor, torch.Tensor]:
        grid = _as_grid(grid or self.grid_size)
        augment = self.training and (self.shift or self.jitter or self.rescale)
        key = (grid, dtype, self.inv_freq.device)
        if not augment and key in self._tables:
            return self._tables[key]
        with torch.autocast(device_type=self.inv_freq.device.type, enabled=False):
            coords = self.augmented_coords(grid)
            angles = 2 * math.pi * coords[:, :, None] * self.inv_freq  # (N, 2, d/4): y then x
            angles = angles.flatten(1).repeat(1, 2)  # [y, x, y, x]
            prefix = angles.new_zeros(self.num_prefix_tokens, self.head_dim)
            angles = torch.cat([prefix, angles], dim=0)
            tables = angles.cos().to(dtype), angles.sin().to(dtype)
        if not augment and not torch.compiler.is_compiling():
            self._tables[key] = tables
        return tables


def _as_grid(grid: Grid) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
