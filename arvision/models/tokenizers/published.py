"""LlamaGen's and MAR's published tokenizer files, as released (``arvision.load_tokenizer``, in
``checkpoints.loading``, reads these and arvision checkpoint directories).

    tok = tokenizer_from_state_dict(read_published("vq_ds16_c2i.pt"))   # LlamaGen VQ-16 -> VQTokenizer (codes)
    tok = tokenizer_from_state_dict(read_published("kl16.ckpt"))        # MAR KL-16 -> KLTokenizer, scale 0.2325

Published files are a dict whose "model" entry is the state dict, read with ``torch.load(weights_only=True)``
(argparse.Namespace, which LlamaGen's training checkpoints carry under "args", is the one extra class allowed).
Which tokenizer a file holds is recognised from its keys (``quantize.embedding.weight`` = LlamaGen VQ;
``encoder.down.0.block.0.conv1.weight`` = LDM/MAR KL) and the architecture is read from the tensor shapes, so
other widths and strides (VQ-8, KL-8, ...) load too. LlamaGen's loader is strict, and so is this one; MAR loads
non-strictly, so unexpected keys of a KL file (e.g. LDM's ``loss.*`` discriminator) are ignored with a warning,
while missing keys are an error. The returned tokenizer is in eval mode on CPU.
"""
from __future__ import annotations

import argparse
import os
import re
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ...files import read_safetensors, read_torch_file
from .base import Tokenizer
from .kl import KLConfig, KLTokenizer, mar_kl16
from .vq import VQConfig, VQTokenizer

PathLike = Union[str, os.PathLike]
TOKENIZER_FAMILIES = ("vq_tokenizer", "kl_tokenizer")
MAR_KL16_SCALE = 0.2325  # MAR engine_mar.py: posterior.sample() * 0.2325


def _levels(sd: Mapping, prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not found:
        raise ValueError(f"no '{prefix}<i>.' keys: not a LlamaGen/LDM autoencoder state dict")
    return max(found) + 1


def _count(sd: Mapping, prefix: str) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def _arch(sd: Mapping, levels: str, block: str) -> dict:
    ch = sd["encoder.conv_in.weight"].shape[0]
    n = _levels(sd, f"encoder.{levels}.")
    ch_mult = tuple(sd[f"encoder.{levels}.{i}.{block}.0.conv1.weight"].shape[0] // ch for i in range(n))
    return dict(in_channels=sd["encoder.conv_in.weight"].shape[1], ch=ch, ch_mult=ch_mult,
                num_res_blocks=_count(sd, f"encoder.{levels}.0.{block}."),
                encoder_attn=f"encoder.{levels}.{n - 1}.attn.0.q.weight" in sd)


def vq_config_from_state_dict(sd: Mapping) -> VQConfig:
    """The VQConfig of a LlamaGen ``VQModel`` state dict, read from its key set and shapes."""
    arch = _arch(sd, "conv_blocks", "res")
    n, e = sd["quantize.embedding.weight"].shape
    used = sd.get("quantize.codebook_used")
    return VQConfig(**arch, z_channels=sd["quant_conv.weight"].shape[1], codebook_size=n, codebook_embed_dim=e,
                    decoder_attn="decoder.conv_blocks.0.attn.0.q.weight" in sd,
                    usage_window=used.numel() if used is not None else VQConfig.usage_window)


def kl_config_from_state_dict(sd: Mapping, scale_factor: Optional[float] = None) -> KLConfig:
    """The KLConfig of an LDM/MAR ``AutoencoderKL`` state dict. ``scale_factor`` defaults to MAR's 0.2325 for the
    KL-16 architecture and 1.0 otherwise."""
    arch = _arch(sd, "down", "block")
    n = len(arch["ch_mult"])
    z = sd["decoder.conv_in.weight"].shape[1]
    cfg = dict(**arch, z_channels=z, double_z=sd["encoder.conv_out.weight"].shape[0] == 2 * z,
               embed_dim=sd["post_quant_conv.weight"].shape[1],
               decoder_attn=f"decoder.up.{n - 1}.attn.0.q.weight" in sd)
    if scale_factor is None:
        kl16 = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in mar_kl16().items()}
        is_kl16 = all(cfg.get(k, v) == v for k, v in kl16.items() if k != "scale_factor") and cfg["ch"] == 128
        scale_factor = MAR_KL16_SCALE if is_kl16 else 1.0
    return KLConfig(**cfg, scale_factor=scale_factor)


def read_published(path: PathLike) -> dict:
    """The state dict inside a published tokenizer file ({"model": sd}, or a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found; pass LlamaGen's vq_ds16_c2i.pt, MAR's kl16.ckpt "
                                "or an arvision tokenizer directory")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = read_torch_file(path, safe_globals=[argparse.Namespace])
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                return dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError(f"{path} holds no state dict (expected a dict with a 'model' entry, as the published "
                     "LlamaGen / MAR tokenizer files)")


def tokenizer_from_state_dict(sd: Mapping[str, torch.Tensor], scale_factor: Optional[float] = None,
                              source: str = "state dict") -> Tokenizer:
    """Build the matching tokenizer for a published-layout state dict and load it (strictness as documented)."""
    if "quantize.embedding.weight" in sd:
        model, strict_extra = VQTokenizer(vq_config_from_state_dict(sd)), True
        if scale_factor not in (None, 1.0):
            raise ValueError("scale_factor applies to continuous (KL) tokenizers only")
    elif "encoder.down.0.block.0.conv1.weight" in sd:
        model, strict_extra = KLTokenizer(kl_config_from_state_dict(sd, scale_factor)), False
    else:
        raise ValueError(f"{source} is neither a LlamaGen VQ tokenizer (no 'quantize.embedding.weight') nor an "
                         "LDM/MAR KL-VAE (no 'encoder.down.0.block.0.conv1.weight')")
    own = model.state_dict()
    sd = dict(sd)
    if "quantize.codebook_used" in own and "quantize.codebook_used" not in sd:  # saved without usage tracking
        sd["quantize.codebook_used"] = own["quantize.codebook_used"]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or shape or (unexpected and strict_extra):
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if strict_extra and
                 unexpected else "", f"mis-shaped {shape[:4]}" if shape else ""]
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(p for p in parts if p))
    other = [k for k in unexpected if not k.startswith("loss.")]
    if other:
        warnings.warn(f"{source}: ignoring {len(other)} keys that are not part of the KL tokenizer, e.g. {other[:3]}")
    model.load_state_dict({k: sd[k] for k in own})
    return model.eval()
