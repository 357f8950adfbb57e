"""Encoder and decoder of the VQGAN / LDM autoencoders, with the module names of either published layout.

The two published tokenizers share one architecture and differ in container names, so one implementation serves
both and its ``state_dict`` keys equal the published ones:

    layout "llamagen" (LlamaGen VQ):  encoder.conv_blocks.{level}.res.{i} / .attn.{i} / .downsample,
                                      encoder.mid.{0,1,2};  decoder.conv_blocks are in decoding order
                                      (index 0 = lowest resolution) with .upsample
    layout "ldm" (MAR / LDM KL-VAE):  encoder.down.{level}.block.{i} / .attn.{i} / .downsample,
                                      encoder.mid.block_1 / attn_1 / block_2;  decoder.up.{level} is indexed by
                                      level (index 0 = full resolution) and run from the last to the first

Encoder: conv_in, per level ``num_res_blocks`` ResnetBlocks (attention after each one at the lowest-resolution
level when ``attn``), a Downsample after every level but the last (so the stride is 2 ** (len(ch_mult) - 1)),
mid block (res, attn, res), GN, SiLU, conv_out. The decoder mirrors it with ``num_res_blocks + 1`` blocks per level.

    enc = Encoder("llamagen", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, out_channels=256, attn=True)
    h = enc(images)          # (B, 256, H / 16, W / 16)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm

LAYOUTS = ("llamagen", "ldm")


class Level(nn.Module):
    """One resolution level: ResnetBlocks (each followed by its AttnBlock when present), then an optional resampler."""

    def __init__(self, blocks: list, attns: list, resample: nn.Module | None, block_name: str, resample_name: str):
        super().__init__()
        self._block_name, self._resample_name = block_name, resample_name
        setattr(self, block_name, nn.ModuleList(blocks))
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            setattr(self, resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(getattr(self, self._block_name)):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        resample = getattr(self, self._resample_name, None)
        return resample(h) if resample is not None else h


class LdmMid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _mid(layout: str, channels: int, dropout: float) -> nn.Module:
    if layout == "llamagen":
        return nn.Sequential(ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                             ResnetBlock(channels, channels, dropout))
    return LdmMid(channels, dropout)


def _check(layout: str, ch_mult: Sequence[int]) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if len(ch_mult) < 1:
        raise ValueError("ch_mult needs at least one level")


class Encoder(nn.Module):
    def __init__(self, layout: str, in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, out_channels: int = 256, attn: bool = True, dropout: float = 0.0):
        super().__init__()
        _check(layout, ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        n = len(ch_mult)
        widths = [ch] + [ch * m for m in ch_mult]
        levels = []
        for i in range(n):
            c_in, c_out = widths[i], widths[i + 1]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, dropout) for j in range(num_res_blocks)]
            attns = [AttnBlock(c_out) for _ in range(num_res_blocks)] if attn and i == n - 1 else []
            down = Downsample(c_out) if i != n - 1 else None
            levels.append(Level(blocks, attns, down, "res" if layout == "llamagen" else "block", "downsample"))
        setattr(self, "conv_blocks" if layout == "llamagen" else "down", nn.ModuleList(levels))
        self._levels = "conv_blocks" if layout == "llamagen" else "down"
        c = widths[-1]
        self.mid = _mid(layout, c, dropout)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def shard_units(self) -> list[nn.Module]:
        """FSDP2 units: each resolution level and the mid block."""
        return [*getattr(self, self._levels), self.mid]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in getattr(self, self._levels):
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, layout: str, in_channels: int = 256, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, out_channels: int = 3, attn: bool = True, dropout: float = 0.0):
        super().__init__()
        _check(layout, ch_mult)
        n = len(ch_mult)
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)
        self.mid = _mid(layout, c, dropout)
        levels = []  # in decoding order: lowest resolution first
        for i in reversed(range(n)):
            c_out = ch * ch_mult[i]
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out, dropout) for j in range(num_res_blocks + 1)]
            attns = [AttnBlock(c_out) for _ in range(num_res_blocks + 1)] if attn and i == n - 1 else []
            up = Upsample(c_out) if i != 0 else None
            levels.append(Level(blocks, attns, up, "res" if layout == "llamagen" else "block", "upsample"))
            c = c_out
        if layout == "llamagen":
            self.conv_blocks = nn.ModuleList(levels)
        else:  # LDM indexes the list by level, i.e. the reverse of decoding order
            self.up = nn.ModuleList(levels[::-1])
        self._layout = layout
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def shard_units(self) -> list[nn.Module]:
        """FSDP2 units: the mid block and each resolution level."""
        return [self.mid, *(self.conv_blocks if self._layout == "llamagen" else self.up)]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        levels = self.conv_blocks if self._layout == "llamagen" else reversed(self.up)
        for level in levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
