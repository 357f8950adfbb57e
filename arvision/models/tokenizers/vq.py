"""VQ tokenizer, LlamaGen-style (VQGAN encoder/decoder with l2-normalised low-dimensional codes; arXiv 2406.06525).

    tok = arvision.create_model("llamagen_vq16")     # the published VQ-16 layout (codebook 16384 x 8, /16)
    codes = tok.encode(images)                        # (B, H/16, W/16) long
    recon = tok.decode(codes)                         # (B, 3, H, W), unclamped
    recon, aux = tok(images)                          # training: straight-through reconstruction + VQ losses

Layout: Encoder (z_channels) -> quant_conv (1x1, z_channels -> codebook_embed_dim) -> VectorQuantizer ->
post_quant_conv (1x1, back to z_channels) -> Decoder. The ``state_dict`` keys and shapes equal LlamaGen's
``VQModel`` (``tokenizer/tokenizer_image/vq_model.py``), so ``vq_ds16_c2i.pt`` loads as published.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..registry import register_family, register_model
from .base import Tokenizer, TokenizerConfigMixin
from .convnet import Decoder, Encoder
from .quantize import VectorQuantizer


@dataclass
class VQConfig(TokenizerConfigMixin):
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)  # stride 2 ** (len - 1): (1, 2, 2) -> /4, (1, 2, 2, 4) -> /8
    num_res_blocks: int = 2           # encoder; the decoder has one more per level
    z_channels: int = 256
    dropout: float = 0.0
    encoder_attn: bool = True         # attention after each res block of the lowest-resolution level
    decoder_attn: bool = True
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    commit_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    usage_window: int = 65536         # length of the recent-codes buffer behind usage()

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self._check_common()
        if self.codebook_size < 2 or self.codebook_embed_dim < 1:
            raise ValueError(f"codebook_size must be >= 2 and codebook_embed_dim >= 1, "
                             f"got {self.codebook_size} x {self.codebook_embed_dim}")


class VQTokenizer(Tokenizer):
    token_type = "discrete"

    def __init__(self, config: Optional[VQConfig] = None, **kwargs):
        super().__init__()
        cfg = self.config = config or VQConfig(**kwargs)
        self.encoder = Encoder("llamagen", cfg.in_channels, cfg.ch, cfg.ch_mult, cfg.num_res_blocks,
                               cfg.z_channels, cfg.encoder_attn, cfg.dropout)
        self.decoder = Decoder("llamagen", cfg.z_channels, cfg.ch, cfg.ch_mult, cfg.num_res_blocks,
                               cfg.in_channels, cfg.decoder_attn, cfg.dropout)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_embed_dim, cfg.commit_beta,
                                        cfg.entropy_loss_ratio, cfg.codebook_l2_norm, cfg.usage_window)
        self.quant_conv = torch.nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def latent_channels(self) -> int:
        return self.config.codebook_embed_dim

    def quantize_images(self, x: torch.Tensor):
        """Images -> QuantizerOutput (straight-through z_q, indices, losses)."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> code indices (B, H/s, W/s), long."""
        self._check_images(x)
        return self.quantize_images(x).indices

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> images (B, 3, h*s, w*s), unclamped."""
        if codes.ndim != 3 or codes.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"decode expects integer codes (B, h, w), got {tuple(codes.shape)} {codes.dtype}")
        return self.decode_latents(self.quantize.lookup(codes.long()))

    def forward(self, x: torch.Tensor):
        """Training pass: (reconstruction, aux) with aux = QuantizerOutput fields as a dict."""
        out = self.quantize_images(x)
        return self.decode_latents(out.z_q), out._asdict()


register_family("vq_tokenizer", VQTokenizer, VQConfig, "LlamaGen-style VQ tokenizer (discrete codes)",
                train_command="tokenizer train", used_by="`arvision tokenizer eval | encode | reconstruct`")


@register_model(family="vq_tokenizer")
def llamagen_vq16():
    """LlamaGen VQ-16 (vq_ds16_c2i.pt): codebook 16384 x 8, /16, ~72M parameters."""
    return dict(ch=128, ch_mult=(1, 1, 2, 2, 4), z_channels=256, codebook_size=16384, codebook_embed_dim=8)


@register_model(family="vq_tokenizer")
def llamagen_vq8():
    """LlamaGen VQ-8 layout: /8."""
    return dict(ch=128, ch_mult=(1, 2, 2, 4), z_channels=256, codebook_size=16384, codebook_embed_dim=8)


@register_model(family="vq_tokenizer")
def vq_f4_32px():
    """Small /4 VQ for 32 px data (CIFAR-10: an 8 x 8 grid), CPU-trainable: ~4.1M parameters."""
    return dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64, codebook_size=1024,
                codebook_embed_dim=8, usage_window=16384)


@register_model(family="vq_tokenizer")
def vq_f4_32px_lite():
    """A quarter-width /4 VQ for 32 px data (~1.0M parameters, ~2.5x the img/s of vq_f4_32px on a CPU): the
    generation quick start's tokenizer for the built-in digits."""
    return dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=512,
                codebook_embed_dim=8, usage_window=16384)


@register_model(family="vq_tokenizer")
def vq_f8_64px():
    """Small /8 VQ (e.g. 64 px -> 8 x 8)."""
    return dict(ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=64, codebook_size=1024,
                codebook_embed_dim=8, usage_window=16384)
