"""LPIPS (Zhang et al. 2018), the perceptual distance of tokenizer training, on torchvision's VGG16 with the LPIPS
v0.1 linear layers, both loaded from files (nothing is downloaded): ``vgg16-397923af.pth`` (torchvision's VGG16
weights, in torch.hub's checkpoint directory or ``vgg_path``) and ``vgg.pth`` (in the ``lpips`` package,
lpips/weights/v0.1/vgg.pth, or ``lin_path``).

    lpips = LPIPS(vgg_path, lin_path)
    distance = lpips(reconstructions, images)      # (B,), images in [-1, 1]
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
