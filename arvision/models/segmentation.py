"""Semantic segmentors on NEPA backbones: the ``segmentor`` model family.

A ``Segmentor`` is a NEPA ViT (bidirectional by default, ``causal`` as a knob) and a decode head:

- ``head="upernet"`` (the NEPA paper's ADE20K setting, after BEiT / MAE): the outputs of four blocks (``out_indices``,
  e.g. 3, 5, 7, 11 of 12) become a 4-scale pyramid (deconvolutions to 4x and 2x, identity, max-pool to 0.5x;
  ``upernet.SimplePyramid``), decoded by UperNet (PPM + FPN, ``upernet.UperHead``), plus an auxiliary FCN head on
  the third level (its loss weighted 0.4 by the objective);
- ``head="linear"``: BatchNorm + 1x1 conv on the last block's patch grid (after the final norm), the baseline.

Logits are upsampled (bilinear) to the input size. Any input size works: the image is zero-padded (bottom/right) to a
multiple of the patch size and the logits cropped back, and RoPE places any patch grid on [-1, 1], so a 512x512 crop
runs through a 224-trained backbone with the same weights and no position interpolation.

    seg = create_model("upernet_nepa_base_patch14_512", num_classes=150)
    logits = seg(images)                                 # (B, 150, H, W)
    logits, aux = seg(images, return_aux=True)           # training: the auxiliary head's logits too
    seg = Segmentor.from_backbone(load_model(ckpt, family="nepa_vit", num_classes=0), num_classes=150)

The config holds the backbone's config as a nested dict, so ``save_model`` / ``load_model`` round-trip segmentors;
it also keeps the class names and colours (``classes``, ``palette``) and the ignore index of its training masks,
used by ``arvision segment eval | predict``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .registry import ConfigDict, preset_fields, register_family, register_model
from .upernet import FCNHead, LinearHead, SimplePyramid, UperHead, resize
from .vit import NepaConfig, NepaViT

HEADS = ("upernet", "linear")
# The label of pixels that count for nothing (mmseg's 255), unless ``segment.ignore_index`` says otherwise: the one
# default of the datasets, the transforms' mask padding, the loss and the metrics.
IGNORE_INDEX = 255


def check_ignore_index(ignore_index: int, num_classes: int) -> None:
    """One line if ``ignore_index`` is a class label (0 .. num_classes - 1): its pixels would be dropped from both the
    loss and the metrics."""
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index={ignore_index} is inside the class range 0..{num_classes - 1}, so that class "
                         f"would be ignored; set segment.ignore_index to a value outside it (e.g. -1, or 65535 for "
                         f"16-bit masks)")
# BEiT / MAE's ADE20K block choices for 12- and 24-block ViTs.
_OUT_INDICES = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}


def default_out_indices(depth: int) -> list[int]:
    """BEiT / MAE's blocks for depth 12 and 24; otherwise the ends of the four quarters of the stack."""
    return list(_OUT_INDICES.get(depth, [max(0, round(depth * k / 4) - 1) for k in (1, 2, 3, 4)]))


@dataclass
class SegmentorConfig(ConfigDict):
    backbone: dict = field(default_factory=dict)  # NepaConfig fields (classifier-free: num_classes is forced to 0)
    num_classes: int = 150
    head: str = "upernet"  # upernet | linear
    out_indices: Optional[list] = None  # upernet: the 4 blocks feeding the pyramid (default: default_out_indices)
    channels: int = 512  # UperNet channels
    pool_scales: list = field(default_factory=lambda: [1, 2, 3, 6])
    aux_head: bool = True  # upernet: auxiliary FCN head on pyramid level aux_index
    aux_index: int = 2
    aux_channels: int = 256
    dropout: float = 0.1  # Dropout2d before the classifiers (mmseg)
    causal: bool = False  # backbone attention (NEPA pretrains causally; dense prediction is bidirectional)
    classes: Optional[list] = None  # class names, in label order
    palette: Optional[list] = None  # [[r, g, b], ...] display colours
    ignore_index: int = IGNORE_INDEX  # the label of unlabelled pixels in the masks it was trained on

    def __post_init__(self):
        bb = NepaConfig.from_dict(dict(self.backbone))
        bb.num_classes, bb.use_mask_token = 0, False
        self.backbone = bb.to_dict()
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        check_ignore_index(self.ignore_index, self.num_classes)
        if self.out_indices is None:
            self.out_indices = default_out_indices(bb.depth)
        from .transformer import parse_blocks

        self.out_indices = [parse_blocks([i], bb.depth)[0] for i in self.out_indices]  # a block may feed 2 levels
        if self.head == "upernet" and len(self.out_indices) != 4:
            raise ValueError(f"the UperNet pyramid takes 4 blocks, got out_indices={self.out_indices}")
        if not 0 <= self.aux_index < 4:
            raise ValueError(f"aux_index must be a pyramid level 0..3, got {self.aux_index}")
        for name, n in (("classes", self.classes), ("palette", self.palette)):
            if n is not None and len(n) != self.num_classes:
                raise ValueError(f"{name} has {len(n)} entries but num_classes={self.num_classes}")
        self.classes = list(self.classes) if self.classes is not None else None
        self.palette = [[int(v) for v in c] for c in self.palette] if self.palette is not None else None
        self.pool_scales = [int(s) for s in self.pool_scales]

    def summary(self) -> str:
        bb = self.backbone
        return (f"head={self.head}, num_classes={self.num_classes}, channels={self.channels}, "
                f"out_indices={self.out_indices}, backbone embed_dim={bb['embed_dim']} depth={bb['depth']} "
                f"patch_size={bb['patch_size']}")


class Segmentor(nn.Module):
    """NEPA backbone + pyramid neck + UperNet (+ auxiliary FCN) or linear head; see the module docstring."""

    def __init__(self, config: Optional[SegmentorConfig] = None, **kwargs):
        super().__init__()
        cfg = self.config = config or SegmentorConfig(**kwargs)
        self.backbone = NepaViT(NepaConfig.from_dict(cfg.backbone))
        D, K = self.backbone.embed_dim, cfg.num_classes
        if cfg.head == "upernet":
            self.neck = SimplePyramid(D)
            self.decode_head = UperHead([D] * 4, cfg.channels, K, cfg.pool_scales, cfg.dropout)
            self.auxiliary_head = FCNHead(D, cfg.aux_channels, K, dropout=cfg.dropout) if cfg.aux_head else None
        else:
            self.neck, self.auxiliary_head = None, None
            self.decode_head = LinearHead(D, K)
        self.init_heads()
        self.freeze_unused()

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one: each backbone block and each head (the pyramid neck, which returns
        views of its input, stays with the root)."""
        return [*self.backbone.shard_units(), *(m for m in (self.decode_head, self.auxiliary_head) if m is not None)]

    def freeze_unused(self) -> None:
        """UperNet reads un-normed block outputs up to the last of ``out_indices``: the final norm and any later
        blocks take no part in the loss, so they are frozen (DDP rejects parameters that get no gradient)."""
        if self.config.head == "upernet":
            self.backbone.norm.requires_grad_(False)
            for blk in self.backbone.blocks[max(self.config.out_indices) + 1:]:
                blk.requires_grad_(False)

    def init_heads(self) -> None:
        """mmseg / BEiT init of the new layers: truncated normal (0.02) linear-like weights, BN (1, 0)."""
        for module in (self.neck, self.decode_head, self.auxiliary_head):
            if module is None:
                continue
            for m in module.modules():
                if isinstance(m, nn.ConvTranspose2d):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    @classmethod
    def from_backbone(cls, backbone: NepaViT, **fields) -> "Segmentor":
        """A segmentor around the weights of an existing (e.g. pretrained) backbone; ``fields`` set the rest of the
        config. The backbone must have no classifier (load it with ``num_classes=0``) and no mask token."""
        if backbone.config.num_classes or getattr(backbone, "mask_token", None) is not None:
            raise ValueError("the backbone has a classifier head or a mask token; load it with num_classes=0 and "
                             "call drop_mask_token() first")
        model = cls(SegmentorConfig(backbone=backbone.config.to_dict(), **fields))
        model.backbone.load_state_dict(backbone.state_dict())
        return model

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad the bottom and right of ``x`` to a multiple of the patch size."""
        p = self.backbone.config.patch_size
        ph, pw = -x.shape[-2] % p, -x.shape[-1] % p
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decode head's inputs for images already padded to a multiple of the patch size: the 4-level
        pyramid (upernet) or [the last block's normed patch grid] (linear)."""
        cfg = self.config
        if cfg.head == "linear":
            return self.backbone.forward_intermediates(x, indices=1, norm=True, intermediates_only=True,
                                                       causal=cfg.causal)
        taken = sorted(set(cfg.out_indices))  # forward_intermediates returns each block once, in block order
        grids = self.backbone.forward_intermediates(x, indices=taken, stop_early=True, intermediates_only=True,
                                                    causal=cfg.causal)
        return self.neck([grids[taken.index(i)] for i in cfg.out_indices])

    def forward_head(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Logits at the finest feature resolution."""
        return self.decode_head(feats if self.config.head == "upernet" else feats[-1])

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """Logits (B, num_classes, H, W) at the input size; with ``return_aux`` also the auxiliary head's logits
        (None without one)."""
        H, W = x.shape[-2:]
        xp = self.pad(x)
        feats = self.forward_features(xp)
        logits = resize(self.forward_head(feats), xp.shape[-2:])[..., :H, :W]
        if not return_aux:
            return logits
        aux = None
        if self.auxiliary_head is not None:
            aux = resize(self.auxiliary_head(feats[self.config.aux_index]), xp.shape[-2:])[..., :H, :W]
        return logits, aux


register_family("segmentor", Segmentor, SegmentorConfig,
                "semantic segmentor: NEPA backbone + UperNet (PPM + FPN, auxiliary FCN) or linear head",
                train_command="segment train", used_by="`arvision segment eval | predict`")


@register_model(family="segmentor")
def upernet_nepa_base_patch14_512():
    """NEPA-B/14 + UperNet, ADE20K (150 classes); the paper reports 48.3 mIoU (not re-run here)."""
    return dict(backbone=preset_fields("nepa_base_patch14_224"), num_classes=150, channels=512,
                out_indices=[3, 5, 7, 11])


@register_model(family="segmentor")
def upernet_nepa_large_patch14_512():
    """NEPA-L/14 + UperNet, ADE20K (150 classes); the paper reports 54.0 mIoU (not re-run here)."""
    return dict(backbone=preset_fields("nepa_large_patch14_224"), num_classes=150, channels=512,
                out_indices=[7, 11, 15, 23])


@register_model(family="segmentor")
def upernet_nepa_tiny_patch4_32():
    """The CPU preset: nepa_tiny_patch4_32 (6 blocks) + a 64-channel UperNet, 11 synthetic classes."""
    return dict(backbone=preset_fields("nepa_tiny_patch4_32"), num_classes=11, channels=64, aux_channels=32,
                out_indices=[1, 2, 3, 5])
