"""What every arvision tokenizer offers, whichever family (VQ codes or KL latents).

    tok.encode(images)        # images (B, 3, H, W) in [-1, 1] -> codes (B, h, w) long, or latents (B, C, h, w)
    tok.decode(tokens)        # -> images (B, 3, H, W), unclamped
    tok.token_type            # "discrete" | "continuous"
    tok.codebook_size         # VQ: number of codes; KL: None
    tok.latent_channels       # KL: channels per token; VQ: the code dimension
    tok.scale_factor          # multiply latents by this before a generator, divide before decode (1.0 for VQ)
    tok.downsample            # stride of the encoder, 2 ** (len(ch_mult) - 1)
    tok.grid_size(256)        # -> 16 for a /16 tokenizer
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..registry import ConfigDict


class TokenizerConfigMixin(ConfigDict):
    """``ConfigDict`` with tuples stored as JSON lists (``ch_mult``) and read back as tuples."""

    @classmethod
    def from_dict(cls, d: dict):
        return super().from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in super().to_dict().items()}

    def _check_common(self) -> None:
        if not self.ch_mult or any(int(m) < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty list of positive integers, got {self.ch_mult}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32] + ([self.ch] if self.ch % 32 else [])
        if bad:
            raise ValueError(f"channel widths {bad} are not multiples of 32 (GroupNorm(32)); change ch or ch_mult")


class Tokenizer(nn.Module):
    token_type: str = ""
    config = None

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def grid_size(self, img_size: int) -> int:
        if img_size % self.downsample:
            raise ValueError(f"image size {img_size} is not a multiple of the tokenizer's stride {self.downsample}")
        return img_size // self.downsample

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one: the encoder's and the decoder's resolution stages."""
        return [*self.encoder.shard_units(), *self.decoder.shard_units()]

    @property
    def scale_factor(self) -> float:
        return float(getattr(self.config, "scale_factor", 1.0))

    @property
    def codebook_size(self) -> Optional[int]:
        return None

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    def _check_images(self, x) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got shape {tuple(x.shape)}")
        self.grid_size(x.shape[-1]), self.grid_size(x.shape[-2])
