"""Perceptual distances of tokenizer training, from files (nothing is downloaded).

LPIPS (Zhang et al. 2018) on torchvision's VGG16 with the LPIPS v0.1 linear layers: ``vgg16-397923af.pth``
(torchvision's VGG16 weights, in torch.hub's checkpoint directory or ``vgg_path``) and ``vgg.pth`` (in the ``lpips``
package, lpips/weights/v0.1/vgg.pth, or ``lin_path``). Where those cannot be had, ``ClassifierDistance`` is the same
recipe in the features of a classifier trained here (a ``timm_classifier`` or a fine-tuned NEPA checkpoint).

    lpips = LPIPS(vgg_path, lin_path)
    distance = lpips(reconstructions, images)      # (B,), images in [-1, 1]
    distance = ClassifierDistance(classifier, mean, std)(reconstructions, images)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ...files import read_torch_file

VGG_FILE = "vgg16-397923af.pth"
LPIPS_FILE = "vgg.pth"


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


class ClassifierDistance(nn.Module):
    """LPIPS's recipe in the features of an arvision classifier checkpoint: the feature maps of its
    ``forward_intermediates`` (every stage of a timm CNN, every block of a ViT), each unit-normalised over channels;
    the squared differences summed over channels, averaged over space, summed over the maps. The channels are
    weighted uniformly (LPIPS's learned weights come from human judgements, which a classifier trained here has not
    seen). Images in [-1, 1] are resized to the classifier's input size and normalised as it was trained (``mean``,
    ``std``: of its [0, 1] inputs). Frozen. ``objectives.tokenizer.classifier_distance(path)`` builds one from a
    checkpoint."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        if not hasattr(net, "forward_intermediates"):
            raise ValueError(f"{type(net).__name__} has no forward_intermediates; the perceptual network must be a "
                             "timm_classifier or NEPA classifier")
        self.net, self.size = net, net.config.img_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 2 - 1, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 2, persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):  # always in eval mode (batch norm statistics stay those of its training)
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,) between images in [-1, 1]."""
        h = torch.cat([x, y]).float()
        if h.shape[-2:] != (self.size, self.size):
            h = torch.nn.functional.interpolate(h, size=(self.size, self.size), mode="bicubic", align_corners=False)
        maps = self.net.forward_intermediates((h - self.mean) / self.std, intermediates_only=True)
        total = 0.0
        for f in maps:
            a, b = f.float().chunk(2)
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (a - b).pow(2).sum(1).mean(dim=(1, 2))
        return total
