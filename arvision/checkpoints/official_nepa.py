"""Official NEPA checkpoints (the Hugging Face ``ViTNepa`` layout, nepa_spec.md §13) <-> arvision ``NepaViT``.

An official checkpoint is a ``save_pretrained`` directory with ``config.json`` and ``model.safetensors`` (or
``pytorch_model.bin``, or shards with an ``*.index.json``); the pretraining EMA copy is ``pytorch_model_ema.bin``.
This module maps the config fields and the state-dict keys both ways (q/k/v are fused into one ``qkv``), reads
such a directory, and writes one. Only the ``nepa_vit`` family has an official counterpart.

    config = official_config_to_arvision(json.load(open("nepa-base/config.json")))
    sd, config = read_official(Path("nepa-base"))                 # arvision keys, NepaConfig
    export_official(model, "out")                                  # config.json + model.safetensors
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ..files import command_line_error, read_json
from ..models.registry import family_of, unwrap
from ..models.vit import NepaConfig, NepaViT
from .arvision_format import PathLike, StateDict, atomic_directory, read_weights_file, write_json, write_safetensors

OFFICIAL_CONFIG = "config.json"
OFFICIAL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
OFFICIAL_EMA = "pytorch_model_ema.bin"

# ----------------------------------------------------------------------------------------------- configs


def _mlp_type(gated: bool, act: str) -> str:
    types = {(False, "gelu"): "gelu", (True, "silu"): "swiglu", (True, "gelu"): "geglu"}
    if (gated, act) not in types:
        raise ValueError(f"unsupported official MLP: use_gated_mlp={gated}, hidden_act={act!r}; arvision supports "
                         "gelu (not gated), and gated silu (SwiGLU) or gelu (GeGLU)")
    return types[(gated, act)]


def official_config_to_arvision(cfg: Mapping) -> NepaConfig:
    """NepaConfig of an official ``config.json`` dict (field names in nepa_spec.md §13)."""
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
               if k not in cfg]
    if missing:
        raise ValueError(f"official NEPA config lacks {missing}; is this a ViTNepa config.json?")
    D = cfg["hidden_size"]
    img = cfg["image_size"]
    if isinstance(img, (list, tuple)):
        if len(set(img)) != 1:
            raise ValueError(f"non-square image_size {img} is not supported")
        img = img[0]
    if not cfg.get("qk_norm", False):
        qk_norm = "off"
    else:
        qk_norm = "affine" if cfg.get("qk_norm_affine", False) else "layernorm"
    hidden = cfg.get("intermediate_size", 4 * D)
    kw = dict(
        img_size=img, patch_size=cfg["patch_size"], in_chans=cfg.get("num_channels", 3), embed_dim=D,
        depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        mlp_hidden=None if hidden == 4 * D else hidden,
        mlp_type=_mlp_type(bool(cfg.get("use_gated_mlp", False)), cfg.get("hidden_act", "gelu")),
        qkv_bias=cfg.get("qkv_bias", True), qk_norm=qk_norm,
        qk_norm_bias=qk_norm == "affine" and bool(cfg.get("qk_norm_bias", False)),
        layerscale=cfg.get("layerscale_value"), norm_eps=cfg.get("layer_norm_eps", 1e-12),
        rope_theta=cfg.get("rope_theta", 100.0), rope_rescale=cfg.get("pos_embed_rescale"),
        rope_shift=cfg.get("pos_embed_shift"), rope_jitter=cfg.get("pos_embed_jitter"),
        drop_path_rate=cfg.get("drop_path_prob", 0.0), causal=cfg.get("is_causal", True),
    )
    if "ViTNepaForImageClassification" in (cfg.get("architectures") or ()):
        kw["num_classes"] = len(cfg.get("id2label") or {})
        kw["global_pool"] = "avg" if cfg.get("add_pooling_layer", True) else "last"
    return NepaConfig(**kw)


def arvision_config_to_official(config: NepaConfig, class_names: Optional[list[str]] = None) -> dict:
    """Official ``config.json`` dict of a NepaConfig (the inverse of :func:`official_config_to_arvision`);
    ``class_names`` label the classifier's outputs (default ``LABEL_i``)."""
    D = config.embed_dim
    gated, act = {"gelu": (False, "gelu"), "swiglu": (True, "silu"), "geglu": (True, "gelu")}[config.mlp_type]
    out = {
        "architectures": ["ViTNepaForImageClassification" if config.num_classes else "ViTNepaForPreTraining"],
        "model_type": "vit_nepa",
        "hidden_size": D, "num_hidden_layers": config.depth, "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_hidden or 4 * D, "hidden_act": act, "use_gated_mlp": gated,
        "image_size": config.img_size, "patch_size": config.patch_size, "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias, "qk_norm": config.qk_norm != "off", "qk_norm_affine": config.qk_norm == "affine",
        "qk_norm_bias": config.qk_norm_bias, "layerscale_value": config.layerscale,
        "rope_theta": config.rope_theta, "pos_embed_rescale": config.rope_rescale,
        "pos_embed_shift": config.rope_shift, "pos_embed_jitter": config.rope_jitter,
        "layer_norm_eps": config.norm_eps, "is_causal": config.causal, "drop_path_prob": config.drop_path_rate,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "num_prompt_token": 0, "torch_dtype": "float32",
    }
    if config.num_classes:
        out["add_pooling_layer"] = config.global_pool == "avg"
        if class_names is not None and len(class_names) != config.num_classes:
            raise ValueError(f"{len(class_names)} class names for a classifier of {config.num_classes} classes")
        names = list(class_names) if class_names is not None else [f"LABEL_{i}" for i in range(config.num_classes)]
        out["id2label"] = {str(i): name for i, name in enumerate(names)}
        out["label2id"] = {name: i for i, name in enumerate(names)}
    return out


def _as_config(config: Union[NepaConfig, Mapping]) -> NepaConfig:
    return config if isinstance(config, NepaConfig) else official_config_to_arvision(config)


# ------------------------------------------------------------------------------------------ state dicts

_OFFICIAL_PREFIX = "vit_nepa."
_TOP = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
        "embeddings.patch_embeddings.projection": "patch_embed", "layernorm": "norm"}
_HEAD = {"fc_norm": "fc_norm", "classifier": "head"}
_LAYER = {  # official module under encoder.layer.{i} -> arvision module under blocks.{i}
    "layernorm_before": "norm1", "attention.attention.q_norm": "attn.q_norm",
    "attention.attention.k_norm": "attn.k_norm", "attention.output.dense": "attn.proj",
    "layer_scale.lambda1": "ls1.gamma", "layernorm_after": "norm2", "intermediate.gate_proj": "mlp.fc1_g",
    "output.dense": "mlp.fc2", "output.layer_scale.lambda1": "ls2.gamma",
}
_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2}
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(name: str, table: Mapping[str, str]) -> Optional[str]:
    """Map ``module.param`` (or an exact parameter name) through a module-name table."""
    for src, dst in table.items():
        if name == src:
            return dst
        if name.startswith(src + "."):
            return dst + name[len(src):]
    return None


def official_to_arvision_state_dict(sd: Mapping[str, torch.Tensor],
                                    config: Union[NepaConfig, Mapping]) -> StateDict:
    """Rename official keys (with or without ``vit_nepa.``) to arvision keys and fuse q/k/v.
    Keys that do not map are kept as they are, so that a fit check names them."""
    config = _as_config(config)
    layer = dict(_LAYER, **{"intermediate.up_proj": "mlp.fc1" if config.mlp_type == "gelu" else "mlp.fc1_x"})
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[int, tuple[str, torch.Tensor]]] = {}
    for key, value in sd.items():
        if (new := _rename(key, _HEAD)) is not None:
            out[new] = value
            continue
        name = key[len(_OFFICIAL_PREFIX):] if key.startswith(_OFFICIAL_PREFIX) else key
        m = _LAYER_KEY.match(name)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            module, _, param = rest.rpartition(".")
            if module in _QKV:
                qkv.setdefault((i, param), {})[_QKV[module]] = (key, value)
                continue
            new = _rename(rest, layer)
            out[key if new is None else f"blocks.{i}.{new}"] = value
            continue
        new = _rename(name, _TOP)
        out[key if new is None else new] = value
    for (i, param), parts in qkv.items():
        if len(parts) == 3:
            out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([parts[j][1] for j in range(3)], dim=0)
        else:  # incomplete: keep the originals so the fit check reports them
            out.update(dict(parts.values()))
    return out


def arvision_to_official_state_dict(sd: Mapping[str, torch.Tensor], config: Union[NepaConfig, Mapping, None] = None,
                                    prefix: str = _OFFICIAL_PREFIX) -> StateDict:
    """Official keys for an arvision state dict (backbone keys under ``prefix``; q/k/v split)."""
    top = {v: k for k, v in _TOP.items()}
    head = {v: k for k, v in _HEAD.items()}
    layer = {v: k for k, v in _LAYER.items()}
    layer.update({"mlp.fc1": "intermediate.up_proj", "mlp.fc1_x": "intermediate.up_proj"})
    out: StateDict = {}
    for key, value in sd.items():
        if (new := _rename(key, head)) is not None:
            out[new] = value
            continue
        m = _BLOCK_KEY.match(key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            base = f"{prefix}encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                param = rest[len("attn.qkv."):]
                for module, part in zip(_QKV, value.chunk(3, dim=0)):
                    out[f"{base}{module}.{param}"] = part
                continue
            new = _rename(rest, layer)
            out[f"{base}{new}" if new is not None else key] = value
            continue
        new = _rename(key, top)
        out[prefix + new if new is not None else key] = value
    return out


# ------------------------------------------------------------------------------------------ directories

def official_weights(directory: Path, ema: bool) -> Path:
    """The weights file of an official directory (``ema``: the pretraining EMA copy)."""
    if ema:
        path = directory / OFFICIAL_EMA
        if not path.is_file():
            problem = f"no {OFFICIAL_EMA} in {directory} (official EMA weights exist only in trainer checkpoints)"
            raise command_line_error(FileNotFoundError(f"{problem}; load it without ema=True"),
                                     f"{problem}; drop --ema")
        return path
    for name in OFFICIAL_WEIGHTS:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no weights in {directory}: expected one of {', '.join(OFFICIAL_WEIGHTS)}")


def read_official(directory: Path, weights: Optional[Path] = None, ema: bool = False) -> tuple[StateDict, NepaConfig]:
    """(arvision-keyed state dict, NepaConfig) of an official directory; ``weights`` picks a file other than the
    default one."""
    config = official_config_to_arvision(read_json(directory / OFFICIAL_CONFIG))
    sd = official_to_arvision_state_dict(read_weights_file(weights or official_weights(directory, ema)), config)
    if "mask_token" in sd:
        config.use_mask_token = True
    return sd, config


def export_official(model: NepaViT, directory: PathLike, class_names: Optional[list[str]] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the official (Hugging Face ViTNepa) layout (``class_names``:
    the classifier's labels in ``id2label``)."""
    model = unwrap(model)
    if family_of(model) != "nepa_vit":
        raise ValueError(f"export_official writes NEPA ViTs only; this is a {family_of(model)} model "
                         "(save it with arvision.save_model instead)")
    target = Path(directory)
    with atomic_directory(target) as tmp:
        write_safetensors(arvision_to_official_state_dict(model.state_dict(), model.config), tmp / "model.safetensors")
        write_json(tmp / OFFICIAL_CONFIG, arvision_config_to_official(model.config, class_names))
    return target
