"""Next-Embedding Predictive Autoregression (NEPA) objective (nepa_spec.md §3).

The model embeds an image into z = cat(CLS, conv(x)); the causal backbone maps z to predictions
zhat (after the final norm). Output t predicts embedding t + 1 (shift by one), targets are detached
(stop-gradient), and the loss is the negative cosine, averaged uniformly over B x N:

    L = -1/(B N) sum_{b,t} cos(zhat_{b,t}, sg(z_{b,t+1}))

Ablation switches (the paper's table): ``shift``, ``stop_grad``, ``causal``, ``mask_ratio`` (random
input masking with a mask token), ``distance`` (cosine or MSE between L2-normalised vectors),
and ``target`` = "online" (the official default) or "ema" (targets from an EMA copy of the embedding).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import NEPA_MEAN, NEPA_STD, normalize_uint8
from ..typed_config import ConfigDict
from .base import Objective


@dataclass
class NepaLossConfig(ConfigDict):
    shift: bool = True
    stop_grad: bool = True
    causal: bool = True
    mask_ratio: float = 0.0
    distance: str = "cosine"  # cosine | mse
    target: str = "online"  # online | ema
    target_ema_decay: float = 0.996

    def __post_init__(self):
        if self.distance not in ("cosine", "mse"):
            raise ValueError(f"objective.distance must be 'cosine' or 'mse', got {self.distance!r}")
        if self.target not in ("online", "ema"):
            raise ValueError(f"objective.target must be 'online' or 'ema', got {self.target!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio must be in [0, 1), got {self.mask_ratio}")


def embedding_distance(pred: torch.Tensor, target: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Per-position distance, computed in fp32: -cos (in [-1, 1]) or the MSE of L2-normalised vectors."""
    pred, target = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    if distance == "cosine":
        return -(pred * target).sum(dim=-1)
    return (pred - target).pow(2).sum(dim=-1)


def random_input_mask(batch: int, num_patches: int, ratio: float, device) -> torch.Tensor:
    """(B, N) boolean mask with exactly round(ratio * N) masked patches per image."""
    n_mask = int(round(ratio * num_patches))
    ranks = torch.rand(batch, num_patches, device=device).argsort(dim=1).argsort(dim=1)
    return ranks < n_mask


def nepa_loss(model: nn.Module, images: torch.Tensor, config: Optional[NepaLossConfig] = None,
              target_model: Optional[nn.Module] = None, return_outputs: bool = False):
    """The NEPA loss of ``model`` on ``images`` (B, C, H, W). With the defaults it is the official loss."""
    cfg = config or NepaLossConfig()
    z = model.embed(images)  # (B, 1 + N, D)
    inputs = z
    if cfg.mask_ratio > 0:
        if getattr(model, "mask_token", None) is None:
            raise ValueError("objective.mask_ratio > 0 needs a model built with use_mask_token=True")
        P = model.num_prefix_tokens
        mask = random_input_mask(z.shape[0], z.shape[1] - P, cfg.mask_ratio, z.device)
        patches = torch.where(mask[..., None], model.mask_token.to(z.dtype), z[:, P:])
        inputs = torch.cat([z[:, :P], patches], dim=1)
    pred = model.forward_tokens(inputs, causal=cfg.causal)
    if cfg.target == "ema":
        if target_model is None:
            raise ValueError("objective.target='ema' needs a target_model (see NepaObjective)")
        with torch.no_grad():
            target = target_model(images)  # an EmbeddingTarget (or any module mapping images to embed()'s output)
    else:
        target = z.detach() if cfg.stop_grad else z
    if cfg.shift:
        pred, target = pred[:, :-1], target[:, 1:]
    else:  # no shift: each position reconstructs its own (patch) embedding; the CLS slot is dropped
        P = model.num_prefix_tokens
        pred, target = pred[:, P:], target[:, P:]
    loss = embedding_distance(pred, target, cfg.distance).mean()
    return (loss, {"pred": pred, "target": target}) if return_outputs else loss


class EmbeddingTarget(nn.Module):
    """The EMA target network of ``target='ema'``: copies of what ``model.embed`` reads (the patch embedding and the
    CLS token; the mask token never reaches a target), frozen and updated by ``update``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.patch_embed = copy.deepcopy(model.patch_embed).requires_grad_(False)
        self.cls_token = nn.Parameter(model.cls_token.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """cat(CLS, conv(x)) as ``model.embed`` computes it, with the target's weights."""
        patches = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1)

    def pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(this target's tensors, the model's tensors that they track), in the same order."""
        return ([*self.patch_embed.parameters(), self.cls_token],
                [*(p.detach() for p in model.patch_embed.parameters()), model.cls_token.detach()])

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """target <- decay * target + (1 - decay) * model, one fused foreach lerp over all tensors."""
        torch._foreach_lerp_(*self.pairs(model), 1.0 - decay)


class NepaObjective(Objective):
    """Wraps the backbone for training: ``objective(images, targets=None) -> (loss, metrics)`` (targets unused).

    Holds the optional EMA target embedding (``target='ema'``, ``EmbeddingTarget``) and reports collapse monitors:
    the mean per-dimension std of the L2-normalised predictions (it falls to 0 on collapse). uint8 images (from
    ``pretrain_transform(..., uint8=True)``) are normalised here, on their device, with ``mean`` / ``std``; float
    images are taken as normalised already."""

    def __init__(self, model: nn.Module, config: Optional[NepaLossConfig] = None,
                 mean: Sequence[float] = NEPA_MEAN, std: Sequence[float] = NEPA_STD):
        super().__init__()
        self.model = model
        self.config = config or NepaLossConfig()
        self.target_model = EmbeddingTarget(model) if self.config.target == "ema" else None
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None):
        if images.dtype == torch.uint8:
            images = normalize_uint8(images, self.mean, self.std)
        loss, out = nepa_loss(self.model, images, self.config, self.target_model, return_outputs=True)
        with torch.no_grad():
            pred = F.normalize(out["pred"].detach().float(), dim=-1)
            pred_std = pred.flatten(0, 1).std(dim=0).mean()
        return loss, {"pred_std": pred_std}

    def after_step(self):
        """Called by the trainer after each optimizer step: update the EMA target embedding."""
        if self.target_model is not None:
            self.target_model.update(self.model, self.config.target_ema_decay)
