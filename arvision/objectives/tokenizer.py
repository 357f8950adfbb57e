"""Tokenizer training losses and the tokenizer objective (VQ-VAE / VQGAN / KL-VAE).

    objective = TokenizerObjective(arvision.create_model("vq_f4_32px"), TokenizerLossConfig(restart_after=100))
    loss, metrics = objective(images, labels)      # labels are ignored; images in [-1, 1]

Terms (weights in TokenizerLossConfig; only reconstruction is on by default):
- reconstruction: mean |x - x^| (l1, default) or (x - x^)^2 (l2);
- VQ (VQ-VAE eq. 3): codebook + beta * commitment (+ LlamaGen's entropy term), computed by the quantizer;
- KL: ``kl_weight * KL(q(z|x) || N(0, I)) / (C*H*W)``: LDM sums the KL per image and the reconstruction per pixel,
  so dividing the per-image KL by the pixel count keeps LDM's weight (1e-6) meaningful next to a per-pixel mean;
- perceptual: LPIPS (Zhang et al. 2018) on torchvision's VGG16 with the LPIPS v0.1 linear layers, both loaded from
  files (nothing is downloaded): ``vgg16-397923af.pth`` (torchvision's VGG16 weights, in torch.hub's checkpoint
  directory or ``lpips_vgg_path``) and ``vgg.pth`` (in the ``lpips`` package, lpips/weights/v0.1/vgg.pth, or
  ``lpips_lin_path``);
- adversarial: PatchGAN (pix2pix / taming NLayerDiscriminator) with the hinge loss, from ``disc_start`` steps on.
  The discriminator is trained in the same backward pass: its loss sees detached reconstructions, and the
  generator's term is evaluated with detached discriminator weights, so one optimizer serves both.

Metrics: rec, psnr (dB, images clamped to [-1, 1]) and the family's terms; VQ adds usage (fraction of the codebook
in the recent-codes window) and perplexity (of this batch's codes); dead-code restarts (``restart_after`` > 0) add
restarted (codes re-seeded at the last step).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..files import read_torch_file
from ..models.registry import ConfigDict
from ..models.tokenizers import DeadCodeRestart, KLTokenizer, VQTokenizer, perplexity
from .base import Objective

VGG_FILE = "vgg16-397923af.pth"
LPIPS_FILE = "vgg.pth"


@dataclass
class TokenizerLossConfig(ConfigDict):
    recon: str = "l1"                 # l1 | l2
    recon_weight: float = 1.0
    codebook_weight: float = 1.0      # VQ: weight of (codebook + commitment + entropy)
    kl_weight: Optional[float] = None  # KL: None = the tokenizer config's kl_weight
    perceptual_weight: float = 0.0    # LPIPS; > 0 needs the weight files (see module docstring)
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


def reconstruction_loss(x: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    diff = x.float() - target.float()
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


def psnr(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2), the reconstruction clamped first."""
    mse = (x.float().clamp(-1, 1) - target.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()


def _find_lpips_lin() -> Optional[Path]:
    try:
        import importlib.util
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / LPIPS_FILE
    return path if path.is_file() else None


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with a VGG16 trunk: per layer (relu1_2 ... relu5_3) unit-normalise the channels, square
    the difference, weight the channels by the learned 1x1 ``lin`` layer, average over space; sum the layers."""

    shift = (-0.030, -0.088, -0.188)
    scale = (0.458, 0.448, 0.450)
    cuts = (4, 9, 16, 23, 30)  # torchvision vgg16.features indices ending relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    chans = (64, 128, 256, 512, 512)

    def __init__(self, vgg_path: Optional[str] = None, lin_path: Optional[str] = None, load: bool = True):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers  # vgg16's trunk, without its 120M-parameter classifier
        self.features = make_layers(cfgs["D"])[: self.cuts[-1]]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.chans)
        self.register_buffer("shift_", torch.tensor(self.shift).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale_", torch.tensor(self.scale).view(1, 3, 1, 1), persistent=False)
        if load:
            self.load_weights(vgg_path, lin_path)
        self.requires_grad_(False).eval()

    def load_weights(self, vgg_path: Optional[str], lin_path: Optional[str]) -> None:
        vgg = Path(vgg_path) if vgg_path else Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE
        lin = Path(lin_path) if lin_path else _find_lpips_lin()
        missing = [f"{VGG_FILE} (torchvision VGG16 ImageNet weights) at {vgg}"] if not vgg.is_file() else []
        if lin is None or not lin.is_file():
            missing.append(f"{LPIPS_FILE} (LPIPS v0.1 linear layers: `pip install lpips` ships it as "
                           f"lpips/weights/v0.1/vgg.pth) at {lin_path or 'the lpips package'}")
        if missing:
            raise FileNotFoundError("the perceptual loss needs " + " and ".join(missing) +
                                    "; copy them there or set objective.lpips_vgg_path / objective.lpips_lin_path, "
                                    "or set objective.perceptual_weight=0")
        sd = read_torch_file(vgg)
        self.features.load_state_dict({k[len("features."):]: v for k, v in sd.items()
                                       if k.startswith("features.") and int(k.split(".")[1]) < self.cuts[-1]})
        lin_sd = read_torch_file(lin)
        self.lins.load_state_dict({f"{i}.weight": lin_sd[f"lin{i}.model.1.weight"] for i in range(len(self.chans))})

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,) between images in [-1, 1]."""
        h = torch.cat([x, y]).float()
        h = (h - self.shift_) / self.scale_
        total, start = 0.0, 0
        for lin, cut in zip(self.lins, self.cuts):
            h = self.features[start:cut](h)
            start = cut
            a, b = h.chunk(2)
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((a - b).pow(2)).mean(dim=(1, 2, 3))
        return total


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix) discriminator as in taming / LlamaGen: 4x4 convs, BatchNorm, LeakyReLU(0.2)."""

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ch * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ch * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


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
        # The LPIPS network is frozen and loaded from files: kept out of the state dict (not an nn.Module child).
        self._lpips = [LPIPS(cfg.lpips_vgg_path, cfg.lpips_lin_path)] if cfg.perceptual_weight > 0 else []
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
            m["lpips"] = lp.detach()
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
