"""Tokenizer training losses and the tokenizer objective (VQ-VAE / VQGAN / KL-VAE).

    objective = TokenizerObjective(arvision.create_model("vq_f4_32px"), TokenizerLossConfig(restart_after=100))
    loss, metrics = objective(images, labels)      # labels are ignored; images in [-1, 1]

Terms (weights in TokenizerLossConfig; only reconstruction is on by default):
- reconstruction: mean |x - x^| (l1, default) or (x - x^)^2 (l2);
- VQ (VQ-VAE eq. 3): codebook + beta * commitment (+ LlamaGen's entropy term), computed by the quantizer;
- KL: ``kl_weight * KL(q(z|x) || N(0, I)) / (C*H*W)``: LDM sums the KL per image and the reconstruction per pixel,
  so dividing the per-image KL by the pixel count keeps LDM's weight (1e-6) meaningful next to a per-pixel mean;
- perceptual: LPIPS (Zhang et al. 2018, ``models/tokenizers/perceptual.py``) on torchvision's VGG16 with the LPIPS
  v0.1 linear layers, both loaded from files (nothing is downloaded): ``vgg16-397923af.pth`` (torchvision's VGG16
  weights, in torch.hub's checkpoint directory or ``lpips_vgg_path``) and ``vgg.pth`` (in the ``lpips`` package,
  lpips/weights/v0.1/vgg.pth, or ``lpips_lin_path``); or, with ``perceptual_net``, the same recipe in the features of a
  classifier checkpoint trained here (``ClassifierDistance``, uniform channel weights);
- adversarial: PatchGAN (pix2pix / taming NLayerDiscriminator, ``models/tokenizers/discriminator.py``) with the
  hinge loss, from ``disc_start`` steps on.
  The discriminator is trained in the same backward pass: its loss sees detached reconstructions, and the
  generator's term is evaluated with detached discriminator weights, so one optimizer serves both.

Metrics: rec, psnr (dB, images clamped to [-1, 1]) and the family's terms; VQ adds usage (fraction of the codebook
in the recent-codes window) and perplexity (of this batch's codes); dead-code restarts (``restart_after`` > 0) add
restarted (codes re-seeded at the last step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..checkpoints import load_model
from ..data.transforms import NEPA_MEAN, NEPA_STD
from ..models.tokenizers import DeadCodeRestart, KLTokenizer, VQTokenizer, perplexity
from ..models.tokenizers.discriminator import PatchDiscriminator
from ..models.tokenizers.perceptual import LPIPS, ClassifierDistance
from ..typed_config import ConfigDict
from .base import Objective


@dataclass
class TokenizerLossConfig(ConfigDict):
    recon: str = "l1"                 # l1 | l2
    recon_weight: float = 1.0
    codebook_weight: float = 1.0      # VQ: weight of (codebook + commitment + entropy)
    kl_weight: Optional[float] = None  # KL: None = the tokenizer config's kl_weight
    perceptual_weight: float = 0.0    # LPIPS; > 0 needs the weight files (see module docstring) or perceptual_net
    perceptual_net: Optional[str] = None  # a classifier checkpoint whose features give the perceptual distance
                                          #   instead of VGG16-LPIPS (models/tokenizers/perceptual.ClassifierDistance)
    lpips_vgg_path: Optional[str] = None
    lpips_lin_path: Optional[str] = None
    disc_weight: float = 0.0          # PatchGAN generator term; > 0 adds a discriminator
    disc_start: int = 0               # optimizer steps before the adversarial terms switch on
    disc_layers: int = 3
    disc_channels: int = 64
    restart_after: int = 0            # VQ: re-seed codes unused for this many steps (0 = off)
    restart_bank: int = 4096          # recent encoder outputs kept for re-seeding

    def __post_init__(self):
        if self.recon not in ("l1", "l2"):
            raise ValueError(f"objective.recon must be 'l1' or 'l2', got {self.recon!r}")
        for key, low in (("recon_weight", 0), ("codebook_weight", 0), ("perceptual_weight", 0), ("disc_weight", 0),
                         ("disc_start", 0), ("disc_layers", 1), ("disc_channels", 1), ("restart_after", 0),
                         ("restart_bank", 1)):
            if getattr(self, key) < low:
                raise ValueError(f"objective.{key} must be >= {low}, got {getattr(self, key)}")
        if self.kl_weight is not None and self.kl_weight < 0:
            raise ValueError(f"objective.kl_weight must be >= 0 or null, got {self.kl_weight}")


def classifier_distance(path: str) -> ClassifierDistance:
    """The perceptual distance in the features of a classifier checkpoint (``objective.perceptual_net``), whose inputs
    were normalised as arvision's transforms normalise them."""
    return ClassifierDistance(load_model(path), NEPA_MEAN, NEPA_STD)


def reconstruction_loss(x: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    diff = x.float() - target.float()
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


def psnr(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2), the reconstruction clamped first."""
    mse = (x.float().clamp(-1, 1) - target.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


class TokenizerObjective(Objective):
    def __init__(self, model: nn.Module, loss: Optional[TokenizerLossConfig] = None):
        super().__init__()
        if not isinstance(model, (VQTokenizer, KLTokenizer)):
            raise ValueError(f"TokenizerObjective trains a VQTokenizer or KLTokenizer, got {type(model).__name__}")
        self.model, self.cfg = model, loss or TokenizerLossConfig()
        cfg = self.cfg
        self.is_vq = isinstance(model, VQTokenizer)
        self.restart = None
        if cfg.restart_after > 0:
            if not self.is_vq:
                raise ValueError("objective.restart_after (dead-code restarts) applies to VQ tokenizers only; "
                                 "set it to 0")
            self.restart = DeadCodeRestart(model.codebook_size, model.latent_channels, cfg.restart_after,
                                           cfg.restart_bank)
        # The perceptual network is frozen and loaded from files: kept out of the state dict (not an nn.Module child).
        self._lpips = []
        if cfg.perceptual_weight > 0:
            self._lpips = [classifier_distance(cfg.perceptual_net) if cfg.perceptual_net
                           else LPIPS(cfg.lpips_vgg_path, cfg.lpips_lin_path)]
        self.discriminator = (PatchDiscriminator(model.config.in_channels, cfg.disc_channels, cfg.disc_layers)
                              if cfg.disc_weight > 0 else None)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("restarted", torch.zeros((), dtype=torch.long))

    def forward(self, images: torch.Tensor, targets=None):
        cfg, m = self.cfg, {}
        recon, aux = self.model(images)
        rec = reconstruction_loss(recon, images, cfg.recon)
        loss = cfg.recon_weight * rec
        m["rec"], m["psnr"] = rec.detach(), psnr(recon.detach(), images)
        if self.is_vq:
            vq = aux["codebook_loss"] + aux["commit_loss"] + aux["entropy_loss"]
            loss = loss + cfg.codebook_weight * vq
            m.update(codebook=aux["codebook_loss"].detach(), commit=aux["commit_loss"].detach(),
                     usage=self.model.quantize.usage(), perplexity=perplexity(aux["indices"], self.model.codebook_size))
            if self.model.config.entropy_loss_ratio > 0:
                m["entropy"] = aux["entropy_loss"].detach()
            if self.restart is not None and self.training:
                self.restart.observe(aux["indices"], aux["z"])
                m["restarted"] = self.restarted.float()
        else:
            kl = aux["kl"].mean() / images[0].numel()
            weight = self.model.config.kl_weight if cfg.kl_weight is None else cfg.kl_weight
            loss = loss + weight * kl
            m["kl"] = kl.detach()
        if self._lpips:
            lp = self._lpips[0].to(images.device)(recon, images).mean()
            loss = loss + cfg.perceptual_weight * lp
            m["perceptual" if cfg.perceptual_net else "lpips"] = lp.detach()
        if self.discriminator is not None:
            on = (self.step >= cfg.disc_start).float()
            g_loss, d_loss = self.adversarial_terms(images, recon)
            loss = loss + on * (cfg.disc_weight * g_loss + d_loss)
            m.update(g_loss=g_loss.detach(), d_loss=d_loss.detach())
        return loss, m

    def adversarial_terms(self, images: torch.Tensor, recon: torch.Tensor):
        """(generator loss, discriminator hinge loss). The generator term runs the discriminator with detached
        weights (gradients reach only the tokenizer); the discriminator term sees detached reconstructions."""
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        g_loss = -functional_call(self.discriminator, frozen, (recon,)).float().mean()
        d_loss = hinge_d_loss(self.discriminator(images), self.discriminator(recon.detach()))
        return g_loss, d_loss

    def after_step(self) -> None:
        self.step += 1
        if self.restart is not None:
            self.restarted.copy_(self.restart.step(self.model.quantize))
