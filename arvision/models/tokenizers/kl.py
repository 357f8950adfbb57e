"""KL tokenizer (continuous latents), MAR's KL-16: the LDM AutoencoderKL (Rombach et al. 2022, arXiv 2112.10752).

    tok = arvision.create_model("mar_kl16")          # the published KL-16 layout: 16 channels, /16
    z = tok.encode(images)                            # posterior mean (B, 16, H/16, W/16), unscaled
    recon = tok.decode(z)                             # (B, 3, H, W), unclamped
    post = tok.posterior(images); post.sample()       # the diagonal Gaussian q(z | x)
    tok.scale_factor                                  # 0.2325 for KL-16: the generator sees z * scale_factor

Layout: Encoder (2 * z_channels when double_z) -> quant_conv (1x1 -> 2 * embed_dim: mean, log-variance) ->
posterior -> post_quant_conv (1x1, embed_dim -> z_channels) -> Decoder. ``state_dict`` keys and shapes equal MAR's
``AutoencoderKL`` (``models/vae.py``), so ``kl16.ckpt`` loads as published. The encoder has attention at its
lowest-resolution level and the decoder none outside its middle block (MAR's attn_resolutions at 256 px).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..registry import register_family, register_model
from .base import Tokenizer, TokenizerConfigMixin
from .convnet import Decoder, Encoder


class DiagonalGaussian:
    """q(z | x) = N(mean, exp(logvar)), log-variance clamped to [-30, 20] as in LDM."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements: 0.5 * sum(mu^2 + var - 1 - logvar)."""
        m, lv = self.mean.float(), self.logvar.float()
        return 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv).sum(dim=(1, 2, 3))


@dataclass
class KLConfig(TokenizerConfigMixin):
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    double_z: bool = True
    embed_dim: int = 16               # latent channels per token
    dropout: float = 0.0
    encoder_attn: bool = True
    decoder_attn: bool = False
    scale_factor: float = 1.0         # latent scale for generators (MAR KL-16: 0.2325); not applied by encode
    kl_weight: float = 1e-6           # LDM's weight of the KL term (see objectives/tokenizer.py for the scaling)

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self._check_common()
        if self.embed_dim < 1 or self.z_channels < 1:
            raise ValueError(f"embed_dim and z_channels must be >= 1, got {self.embed_dim}, {self.z_channels}")
        if not self.scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {self.scale_factor}")


class KLTokenizer(Tokenizer):
    token_type = "continuous"

    def __init__(self, config: Optional[KLConfig] = None, **kwargs):
        super().__init__()
        cfg = self.config = config or KLConfig(**kwargs)
        zc = (2 if cfg.double_z else 1) * cfg.z_channels
        self.encoder = Encoder("ldm", cfg.in_channels, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, zc,
                               cfg.encoder_attn, cfg.dropout)
        self.decoder = Decoder("ldm", cfg.z_channels, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.in_channels,
                               cfg.decoder_attn, cfg.dropout)
        self.quant_conv = torch.nn.Conv2d(zc, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> posterior mean (B, embed_dim, H/s, W/s), not scaled."""
        self._check_images(x)
        return self.posterior(x).mean

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """(mean, log-variance) concatenated on channels, (B, 2 * embed_dim, h, w): what MAR caches."""
        self._check_images(x)
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, embed_dim, h, w), unscaled -> images (B, 3, h*s, w*s), unclamped."""
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"decode expects latents (B, {self.config.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True):
        """Training pass: (reconstruction from a posterior sample (or the mean), aux with kl / mean / logvar)."""
        post = self.posterior(x)
        z = post.sample() if sample else post.mean
        return self.decode(z), dict(kl=post.kl(), mean=post.mean, logvar=post.logvar)


register_family("kl_tokenizer", KLTokenizer, KLConfig, "MAR/LDM-style KL-VAE tokenizer (continuous latents)",
                train_command="tokenizer train", used_by="`arvision tokenizer eval | encode | reconstruct`")


@register_model(family="kl_tokenizer")
def mar_kl16():
    """MAR KL-16 (kl16.ckpt): 16 latent channels, /16, scale factor 0.2325."""
    return dict(ch=128, ch_mult=(1, 1, 2, 2, 4), z_channels=16, embed_dim=16, double_z=True, scale_factor=0.2325)


@register_model(family="kl_tokenizer")
def kl_f4_32px():
    """Small /4 KL-VAE for 32 px data (CIFAR-10: 8 x 8 x 16 latents), CPU-trainable."""
    return dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, embed_dim=16)


@register_model(family="kl_tokenizer")
def kl_f8_64px():
    """Small /8 KL-VAE (e.g. 64 px -> 8 x 8 x 16)."""
    return dict(ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16, embed_dim=16)
