"""Dense-prediction heads for ViT backbones: the 4-scale feature pyramid of BEiT / MAE, UperNet's decode head
(pyramid pooling + FPN; Xiao et al. 2018, as mmseg's ``UPerHead``), the auxiliary FCN head and the linear baseline.

    neck = SimplePyramid(768)                       # 4 patch grids (B, D, h, w) -> scales 4x, 2x, 1x, 0.5x
    head = UperHead([768] * 4, channels=512, num_classes=150)
    logits = head(neck(grids))                      # (B, 150, 4h, 4w), at the finest level's resolution

Every conv is mmseg's ``ConvModule``: conv without bias, BatchNorm, ReLU. Resizing is bilinear with
``align_corners=False`` (mmseg's UperNet configs).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 1) -> nn.Sequential:
    """mmseg ``ConvModule(in_ch, out_ch, kernel, padding=kernel // 2, norm_cfg=BN, act_cfg=ReLU)``."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


def resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class SimplePyramid(nn.Module):
    """The BEiT / MAE segmentation neck: four same-resolution ViT grids -> 4x (two stride-2 deconvolutions with
    BN + GELU between), 2x (one deconvolution), 1x (identity) and 0.5x (2x2 max pooling)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)

    def forward(self, grids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(grids) != 4:
            raise ValueError(f"the feature pyramid takes 4 block outputs, got {len(grids)}")
        return [op(g) for op, g in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), grids)]


class SegHead(nn.Module):
    """mmseg's ``cls_seg``: Dropout2d then a 1x1 conv to the class logits."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's init of the classifier
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UperHead(nn.Module):
    """UperNet decode head: pyramid pooling (PPM, scales 1, 2, 3, 6) on the coarsest level, a top-down FPN over the
    others, the levels upsampled to the finest and fused by a 3x3 conv, then the classifier."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(top, channels))
                                          for s in pool_scales])
        self.bottleneck = conv_bn_relu(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([conv_bn_relu(c, channels) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.cls = SegHead(channels, num_classes, dropout)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [resize(m(x), x.shape[2:]) for m in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.psp_forward(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [resize(x, size) for x in outs[1:]]
        return self.cls(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(nn.Module):
    """mmseg's auxiliary ``FCNHead`` (num_convs=1, concat_input=False): 3x3 conv-BN-ReLU, then the classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(*[conv_bn_relu(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)])
        self.cls = SegHead(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.convs(x))


class LinearHead(nn.Module):
    """The linear baseline (DINOv2's ``BNHead`` with one level): BatchNorm then a 1x1 conv on the patch grid."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.cls = SegHead(dim, num_classes, dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.bn(x))
