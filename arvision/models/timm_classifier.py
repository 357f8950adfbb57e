"""Any timm image classifier as an arvision model family, so that it trains with the one Trainer, saves and loads as an
arvision checkpoint, and serves as the feature extractor of generative metrics (``FD-<name>``, sample accuracy).

    model = arvision.create_model("timm_resnet10t_32px", num_classes=10)   # timm's resnet10t, random init
    logits = model(images)                                              # (B, 10); images normalised to [-1, 1]
    pooled = model.forward_head(model.forward_features(images), pre_logits=True)

The generation quick start (``arvision heptapod train`` with no data) trains one on the real digits to score samples.
The weights are timm's own module tree under ``net.`` (timm names, no renaming); nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .registry import ConfigDict, register_family, register_model


@dataclass
class TimmClassifierConfig(ConfigDict):
    arch: str = "resnet10t"  # any name timm.list_models() gives
    num_classes: int = 10
    img_size: int = 32  # the input size it is trained at (inputs of another size are resized by the extractor)
    in_chans: int = 3
    kwargs: dict = field(default_factory=dict)  # more timm.create_model keyword arguments (e.g. drop_rate)


class TimmClassifier(nn.Module):
    def __init__(self, config: Optional[TimmClassifierConfig] = None, **kwargs):
        super().__init__()
        import timm

        cfg = self.config = config or TimmClassifierConfig(**kwargs)
        if cfg.arch not in timm.list_models():
            raise ValueError(f"timm has no model {cfg.arch!r}; see timm.list_models()")
        self.net = timm.create_model(cfg.arch, pretrained=False, num_classes=cfg.num_classes, in_chans=cfg.in_chans,
                                     **cfg.kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.net.forward_head(x, pre_logits=pre_logits)

    def forward_intermediates(self, x: torch.Tensor, indices=None, intermediates_only: bool = False, **kwargs):
        """timm's: the feature maps of the stages ``indices`` selects (None: every one), NCHW."""
        return self.net.forward_intermediates(x, indices=indices, intermediates_only=intermediates_only, **kwargs)

    def shard_units(self) -> list[nn.Module]:
        """The stages timm names in ``feature_info`` that hold weights (what FSDP2 shards one by one)."""
        named = dict(self.net.named_modules())
        stages = [named[f["module"]] for f in getattr(self.net, "feature_info", []) if f.get("module") in named]
        return [m for m in stages if any(True for _ in m.parameters())]

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        if causal:
            raise ValueError(f"{self.config.arch} has no attention to make causal; drop finetune.causal")
        return self.net(x)


register_family("timm_classifier", TimmClassifier, TimmClassifierConfig, "a timm image classifier",
                used_by="`arvision eval fid --extractor PATH` (as a judge)")


@register_model(family="timm_classifier")
def timm_resnet10t_32px():
    """timm's ResNet-10-T (4.9M parameters; 3x the img/s of ResNet-18 on a CPU) for 32 px inputs, e.g. to score
    generated digits."""
    return dict(arch="resnet10t", img_size=32)
