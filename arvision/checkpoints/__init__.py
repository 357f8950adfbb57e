"""Checkpoints: the arvision format, official NEPA (Hugging Face) checkpoints, and conversion between them.

arvision format: a directory holding ``model.safetensors`` (NepaViT state_dict), optionally ``ema.safetensors``
(EMA weights, same keys), and ``arvision.json`` = {"format": "arvision", "format_version": 1,
"model": NepaConfig.to_dict(), "preset": name or null}. Trainer checkpoints add files that are ignored here.

Official format (nepa_spec.md §13): a ``save_pretrained`` directory with ``config.json`` and ``model.safetensors``
(or ``pytorch_model.bin``, or shards with an ``*.index.json``); the pretraining EMA copy is ``pytorch_model_ema.bin``.

    model = load_model("SixAILab/nepa-base-patch14-224")          # Hub id, official directory or arvision directory
    model = load_model("runs/pretrain/last", ema=True, causal=False)
    save_model(model, "ckpt")                                      # atomic
    convert("nepa-base-patch14-224", "ckpt")                       # official -> arvision
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from ..models.registry import list_models, model_config
from ..models.vit import NepaConfig, NepaViT

FORMAT = "arvision"
FORMAT_VERSION = 1
META_FILE = "arvision.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OFFICIAL_CONFIG = "config.json"
OFFICIAL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
OFFICIAL_EMA = "pytorch_model_ema.bin"
HEAD_KEYS = ("head.", "fc_norm.")

PathLike = Union[str, os.PathLike]
StateDict = dict[str, torch.Tensor]

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


def arvision_config_to_official(config: NepaConfig) -> dict:
    """Official ``config.json`` dict of a NepaConfig (the inverse of :func:`official_config_to_arvision`)."""
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
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_classes)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(config.num_classes)}
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


# ------------------------------------------------------------------------------------------- fit check

def _fmt(items: list[str], limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _describe(cfg: NepaConfig) -> str:
    return (f"NepaViT(embed_dim={cfg.embed_dim}, depth={cfg.depth}, num_heads={cfg.num_heads}, "
            f"mlp_type={cfg.mlp_type}, mlp_hidden={cfg.mlp_hidden or 4 * cfg.embed_dim}, qk_norm={cfg.qk_norm}, "
            f"layerscale={'on' if cfg.layerscale else 'off'}, num_classes={cfg.num_classes}, "
            f"patch_size={cfg.patch_size})")


def _fill_qk_norm(model: NepaViT, sd: StateDict) -> None:
    """An affine QK-Norm model fed a checkpoint without QK-Norm weights (the official base pretraining
    checkpoint into a fine-tune config) starts from weight 1 and bias 0, as the official init script."""
    if any(".attn.q_norm." in k or ".attn.k_norm." in k for k in sd):
        return
    for key, value in model.state_dict().items():
        if ".attn.q_norm." in key or ".attn.k_norm." in key:
            sd[key] = torch.ones_like(value) if key.endswith(".weight") else torch.zeros_like(value)


def load_state_dict_checked(model: NepaViT, sd: StateDict, source: str = "checkpoint", skip_head: bool = False):
    """Load an arvision-keyed state dict, or raise one ValueError line naming what does not fit."""
    sd = dict(sd)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if skip_head:
        sd = {k: v for k, v in sd.items() if not k.startswith(HEAD_KEYS)}
        expected = {k: s for k, s in expected.items() if not k.startswith(HEAD_KEYS)}
    _fill_qk_norm(model, sd)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k} {tuple(sd[k].shape)} in checkpoint vs {tuple(s)} in model"
                  for k, s in expected.items() if k in sd and sd[k].shape != s]
    if missing or unexpected or mismatched:
        parts = [f"{label} {_fmt(items)}" for label, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                 if items]
        raise ValueError(f"{source} does not fit {_describe(model.config)}: {'; '.join(parts)}; pass the preset/"
                         "config the checkpoint was made with, or use arvision.checkpoints.load_model(path), which reads it")
    model.load_state_dict(sd, strict=not skip_head)
    return model


# ------------------------------------------------------------------------------------------------ reading

def _load_weights_file(path: Path) -> StateDict:
    if path.name.endswith(".index.json"):  # sharded Hugging Face checkpoint
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        sd: StateDict = {}
        for shard in shards:
            sd.update(_load_weights_file(path.parent / shard))
        return sd
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    if path.suffix in (".bin", ".pt", ".pth"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"unsupported weights file {path}; expected .safetensors, .bin or a sharded *.index.json")


def _read_meta(path: Path) -> NepaConfig:
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise ValueError(f"{path} is not an arvision checkpoint description (format {meta.get('format')!r})")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta['format_version']}, newer than this arvision "
                         f"({FORMAT_VERSION}); upgrade arvision")
    return NepaConfig.from_dict(meta["model"])


def _official_weights(directory: Path, ema: bool) -> Path:
    if ema:
        path = directory / OFFICIAL_EMA
        if not path.is_file():
            raise FileNotFoundError(f"no {OFFICIAL_EMA} in {directory} (official EMA weights exist only in trainer "
                                    "checkpoints); load it without ema=True")
        return path
    for name in OFFICIAL_WEIGHTS:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no weights in {directory}: expected one of {', '.join(OFFICIAL_WEIGHTS)}")


def _hub_download(repo_id: str, ema: bool) -> Path:
    """Download a Hub repo (``owner/name`` or ``owner/name@revision``), only the files a load needs."""
    repo, _, revision = repo_id.partition("@")
    where = f"{repo_id!r} is not a local path"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{where}, and downloading it from the Hugging Face Hub needs huggingface_hub: "
                          "pip install 'arvision[hf]', or download the folder and pass its path") from None
    patterns = ["*.json", OFFICIAL_EMA, EMA_FILE] if ema else ["*.json", "*.safetensors"]
    try:
        local = Path(snapshot_download(repo, revision=revision or None, allow_patterns=patterns))
        if not ema and not any(local.glob("*.safetensors")):  # older saves: pytorch_model.bin (+ shards)
            bins = ["pytorch_model.bin", "pytorch_model-*.bin"]
            local = Path(snapshot_download(repo, revision=revision or None, allow_patterns=bins))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OSError(f"{where}, and downloading it from the Hugging Face Hub failed ({msg}); check the name and "
                      "the network, or download the folder and pass its path") from None
    return local


def _resolve(source: PathLike, ema: bool) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", text) and not text.startswith((".", "/")):
        return _hub_download(text, ema)
    raise FileNotFoundError(f"checkpoint not found: {text} (expected an arvision or official NEPA checkpoint "
                            "directory, a .safetensors file, or a Hugging Face Hub id like owner/name)")


def read_checkpoint(source: PathLike, ema: bool = False) -> tuple[StateDict, NepaConfig]:
    """(arvision-keyed state dict on the CPU, NepaConfig) of any supported checkpoint source."""
    path = _resolve(source, ema)
    if path.is_file():
        if ema:
            raise ValueError(f"ema=True needs a checkpoint directory, got the file {path}; pass the EMA file itself")
        directory, weights = path.parent, path
    else:
        directory, weights = path, None
    if (directory / META_FILE).is_file():
        if weights is None:
            weights = directory / (EMA_FILE if ema else WEIGHTS_FILE)
            if not weights.is_file():
                hint = "it was saved without EMA weights; load it without ema=True" if ema else "incomplete save?"
                raise FileNotFoundError(f"no {weights.name} in arvision checkpoint {directory} ({hint})")
        return _load_weights_file(weights), _read_meta(directory / META_FILE)
    if not (directory / OFFICIAL_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} holds neither {META_FILE} (arvision) nor {OFFICIAL_CONFIG} (official "
                                "NEPA); pass a checkpoint directory, or a weights file that has one beside it")
    config = official_config_to_arvision(json.loads((directory / OFFICIAL_CONFIG).read_text()))
    sd = official_to_arvision_state_dict(_load_weights_file(weights or _official_weights(directory, ema)), config)
    if "mask_token" in sd:
        config.use_mask_token = True
    return sd, config


def load_model(source: PathLike, ema: bool = False, map_location: Union[str, torch.device] = "cpu",
               **overrides) -> NepaViT:
    """Build a NepaViT from an arvision or official checkpoint directory, a .safetensors file with its
    arvision.json beside it, or a Hugging Face Hub id; returned in eval mode.

    ``overrides`` replace config fields that do not change weight shapes (causal=False, drop_path_rate=0.1,
    rope_rescale=None, img_size=...). Changing ``num_classes`` or ``global_pool`` gives a fresh classifier
    (zero head, as the official fine-tune init) on the checkpoint's backbone."""
    sd, config = read_checkpoint(source, ema)
    stored = config.to_dict()
    cfg = NepaConfig.from_dict({**stored, **overrides})
    new_head = any(k in overrides and overrides[k] != stored[k] for k in ("num_classes", "global_pool"))
    model = NepaViT(cfg)
    load_state_dict_checked(model, sd, f"checkpoint {source}", skip_head=new_head)
    return model.to(map_location).eval()


def load_weights(model: NepaViT, source: PathLike, ema: bool = False, skip_head: bool = False) -> NepaViT:
    """Load any supported checkpoint's weights into an existing model (one-line ValueError if they do not fit).
    ``skip_head`` keeps the model's own classifier and fc_norm (e.g. a pretrained backbone for fine-tuning)."""
    sd, _ = read_checkpoint(source, ema)
    return load_state_dict_checked(model, sd, f"checkpoint {source}", skip_head=skip_head)


# ------------------------------------------------------------------------------------------------ writing

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(directory: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory to write into; on success it is fsynced and renamed to
    ``directory`` (replacing an existing one only then); on failure it is removed and nothing changes."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another checkpoint path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _tensors(sd: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _unwrap(model: torch.nn.Module) -> NepaViT:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_model(model: NepaViT, directory: PathLike, ema_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
               preset: Optional[str] = None, extra_files: Optional[Callable[[Path], None]] = None,
               state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Write an arvision checkpoint directory atomically; returns its path. ``extra_files(tmp_dir)`` may add
    more files (e.g. a trainer's state.pt) that then appear together with the weights. ``state_dict`` replaces
    ``model.state_dict()`` (e.g. the gathered full state of a sharded model)."""
    model = _unwrap(model)
    target = Path(directory)
    with atomic_directory(target) as tmp:
        weights = state_dict if state_dict is not None else model.state_dict()
        save_file(_tensors(weights), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if ema_state_dict is not None:
            save_file(_tensors(ema_state_dict), str(tmp / EMA_FILE), metadata={"format": "pt"})
        _write_json(tmp / META_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                      "model": model.config.to_dict(), "preset": preset})
        if extra_files is not None:
            extra_files(tmp)
    return target


def export_official(model: NepaViT, directory: PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the official (Hugging Face ViTNepa) layout."""
    model = _unwrap(model)
    target = Path(directory)
    with atomic_directory(target) as tmp:
        sd = arvision_to_official_state_dict(model.state_dict(), model.config)
        save_file(_tensors(sd), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / OFFICIAL_CONFIG, arvision_config_to_official(model.config))
    return target


def matching_preset(config: NepaConfig) -> Optional[str]:
    """The registered preset whose config equals ``config``, if any."""
    wanted = config.to_dict()
    return next((name for name in list_models() if model_config(name).to_dict() == wanted), None)


def convert(src: PathLike, dst: PathLike, ema: bool = False) -> Path:
    """Load any supported checkpoint (``ema=True``: its EMA weights) and write it as an arvision checkpoint."""
    model = load_model(src, ema=ema)
    return save_model(model, dst, preset=matching_preset(model.config))
