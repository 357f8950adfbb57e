"""The load policy: where a checkpoint comes from, which model it rebuilds, and whether its weights fit.

A source is an arvision checkpoint directory (any registered model family), an official NEPA directory
(``nepa_vit``), a ``.safetensors`` file with its ``arvision.json`` or ``config.json`` beside it, or a Hugging Face
Hub id (``owner/name[@revision]``, downloaded with huggingface_hub). Weights that do not fit the model give one
ValueError line naming the missing, unexpected and mis-shaped keys.

    model = load_model("SixAILab/nepa-base-patch14-224")           # Hub id, official or arvision directory
    model = load_model("runs/pretrain/last", family="nepa_vit", ema=True, causal=False)
    tok = load_model("runs/tokenizer/last")                         # the stored family's class
    tok = load_tokenizer("vq_ds16_c2i.pt")                          # LlamaGen / MAR files as published, or dirs
    load_weights(model, "runs/pretrain/last", skip_head=True)       # into an existing model
    convert("nepa-base-patch14-224", "ckpt")                        # official -> arvision
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ..files import command_line_error
from ..models.registry import get_family, list_families, list_models, model_config
from ..models.segmentation import Segmentor
from ..models.tokenizers import TOKENIZER_FAMILIES, KLTokenizer, Tokenizer, read_published, tokenizer_from_state_dict
from .arvision_format import (
    EMA_FILE, META_FILE, PathLike, StateDict, arvision_weights, read_meta, read_weights_file, save_model,
)
from .official_nepa import OFFICIAL_CONFIG, OFFICIAL_EMA, read_official

HEAD_KEYS = ("head.", "fc_norm.")  # the nepa_vit classifier (NepaViT.classifier_keys), for the official converters

# ------------------------------------------------------------------------------------------- fit check

def _fmt(items: list[str], limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def describe(model: torch.nn.Module) -> str:
    """``Class(short config summary)``: the config's ``summary()`` when it has one."""
    cfg = model.config
    if callable(getattr(cfg, "summary", None)):
        summary = cfg.summary()
    else:
        summary = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items())
    return f"{type(model).__name__}({summary})"


def _head_keys(model: torch.nn.Module) -> tuple[str, ...]:
    keys = getattr(model, "classifier_keys", None)
    if not keys:
        raise ValueError(f"skip_head applies to models with a replaceable classifier; {type(model).__name__} has "
                         "none: load it without skip_head")
    return keys


def load_state_dict_checked(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint",
                            skip_head: bool = False, overrides: Optional[Mapping[str, Any]] = None):
    """Load a state dict (arvision keys), or raise one ValueError line naming what does not fit.
    ``skip_head`` leaves the classifier (the family's ``classifier_keys``) as the model has it; the family's
    ``checkpoint_filter_fn`` (timm's hook) adapts older or official layouts first; ``overrides`` (the config fields
    the caller changed) only shape the message."""
    sd = dict(sd)
    if callable(getattr(model, "checkpoint_filter_fn", None)):
        sd = model.checkpoint_filter_fn(sd)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if skip_head:
        head = _head_keys(model)
        sd = {k: v for k, v in sd.items() if not k.startswith(head)}
        expected = {k: s for k, s in expected.items() if not k.startswith(head)}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k} {tuple(sd[k].shape)} in checkpoint vs {tuple(s)} in model"
                  for k, s in expected.items() if k in sd and sd[k].shape != s]
    if missing or unexpected or mismatched:
        parts = [f"{label} {_fmt(items)}" for label, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                 if items]
        if overrides:
            changed = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
            hint = (f"overrides ({changed}) may change only config fields that keep the weight shapes; drop the "
                    "ones that change them")
        else:
            hint = ("pass the preset/config the checkpoint was made with, or use arvision.checkpoints.load_model(path),"
                    " which reads it")
        problem = f"{source} does not fit {describe(model)}: {'; '.join(parts)}"
        # a command builds the model from the config saved with the weights: they disagree, the checkpoint is damaged
        raise command_line_error(ValueError(f"{problem}; {hint}"), f"{problem}; " + (
            hint if overrides else "its weights do not match the config saved with them: use an intact copy, or "
            "convert the original again (`arvision convert`)"))
    model.load_state_dict(sd, strict=not skip_head)
    return model


# ------------------------------------------------------------------------------------------------ sources

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


def is_hub_id(source: PathLike) -> bool:
    """Whether ``source`` names a Hugging Face Hub repository (``owner/name[@revision]``) rather than a local path."""
    text = str(source)
    return (not Path(text).expanduser().exists() and not text.startswith((".", "/"))
            and re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", text) is not None)


def resolve_source(source: PathLike, ema: bool = False) -> Path:
    """The local path of a checkpoint source: the path itself, or a Hub id's downloaded snapshot."""
    return _resolve(source, ema)


def _resolve(source: PathLike, ema: bool) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if is_hub_id(text):
        return _hub_download(text, ema)
    raise FileNotFoundError(f"checkpoint not found: {text} (expected an arvision or official NEPA checkpoint "
                            "directory, a .safetensors file, or a Hugging Face Hub id like owner/name)")


def read_family_checkpoint(source: PathLike, ema: bool = False) -> tuple[StateDict, str, Any]:
    """(state dict on the CPU, family name, config dataclass) of any supported checkpoint source."""
    path = _resolve(source, ema)
    if path.is_file():
        if ema:
            raise command_line_error(
                ValueError(f"ema=True needs a checkpoint directory, got the file {path}; pass the EMA file itself"),
                f"--ema needs a checkpoint directory, got the file {path}; drop --ema, or pass the EMA weights file "
                "itself")
        directory, weights = path.parent, path
    else:
        directory, weights = path, None
    if (directory / META_FILE).is_file():
        family, config, _ = read_meta(directory / META_FILE)
        return read_weights_file(weights or arvision_weights(directory, ema)), family, config
    if not (directory / OFFICIAL_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} holds neither {META_FILE} (arvision) nor {OFFICIAL_CONFIG} (official "
                                "NEPA); pass a checkpoint directory, or a weights file that has one beside it")
    sd, config = read_official(directory, weights, ema)
    return sd, "nepa_vit", config


def _check_family(source: PathLike, stored: str, expected: Union[str, tuple[str, ...], None]) -> None:
    wanted = (expected,) if isinstance(expected, str) else tuple(expected or ())
    if not wanted or stored in wanted:
        return
    for name in wanted:
        get_family(name)  # an unknown name says so first
    problem = f"{source} is a {stored} checkpoint, not {' or '.join(wanted)}"
    raise command_line_error(
        ValueError(f"{problem}; load it with arvision.load_model(path, family={stored!r})"),
        f"{problem}, which this command takes; {stored} checkpoints go to "
        f"{_used_by(stored)}")


def _used_by(family: str) -> str:
    """The commands that take a family's checkpoints (its registered ``used_by``), for wrong-family errors."""
    return get_family(family).used_by or f"`arvision models --family {family}`"


# ---------------------------------------------------------------------------------------------- loading

def load_model(source: PathLike, family: Union[str, tuple[str, ...], None] = None, ema: bool = False,
               map_location: Union[str, torch.device] = "cpu", **overrides) -> torch.nn.Module:
    """Rebuild the model a checkpoint holds (its stored family's class) with its weights, in eval mode.

    ``family`` names the family the caller expects (e.g. ``"nepa_vit"``), or a tuple of them; a checkpoint of
    another family gives one ValueError line. ``overrides`` replace config fields that do not change weight shapes (``causal=False``,
    ``drop_path_rate=0.1``, ``rope_rescale=None``, ``img_size=...``). For ``nepa_vit``, changing ``num_classes``
    or ``global_pool`` gives a fresh classifier (zero head, as the official fine-tune init) on the checkpoint's
    backbone, and ``qk_norm="affine"`` on a checkpoint without QK-Norm weights starts them at 1 / 0."""
    sd, stored_family, config = read_family_checkpoint(source, ema)
    _check_family(source, stored_family, family)
    fam = get_family(stored_family)
    stored = config.to_dict()
    cfg = fam.config_cls.from_dict({**stored, **overrides})
    changed = {k: v for k, v in overrides.items() if stored[k] != v}
    head_fields = getattr(fam.model_cls, "classifier_fields", ())
    model = fam.model_cls(cfg)
    load_state_dict_checked(model, sd, f"checkpoint {source}", skip_head=any(k in changed for k in head_fields),
                            overrides=changed)
    return model.to(map_location).eval()


def load_weights(model: torch.nn.Module, source: PathLike, ema: bool = False,
                 skip_head: bool = False) -> torch.nn.Module:
    """Load any supported checkpoint's weights into an existing model of the same family (one-line ValueError
    if they do not fit). ``skip_head`` keeps the model's own classifier and fc_norm (a pretrained backbone for
    fine-tuning)."""
    sd, stored_family, _ = read_family_checkpoint(source, ema)
    _check_family(source, stored_family, getattr(model, "family", None))
    return load_state_dict_checked(model, sd, f"checkpoint {source}", skip_head=skip_head)


def _plain(d: dict) -> dict:
    """As stored in arvision.json (tuples become lists), so a reloaded config compares equal to its preset."""
    return json.loads(json.dumps(d))


def _config_family(config) -> Optional[str]:
    return next((n for n in list_families() if isinstance(config, get_family(n).config_cls)), None)


def matching_preset(config, family: Optional[str] = None) -> Optional[str]:
    """The registered preset of the config's family whose config equals ``config``, if any."""
    family = family or _config_family(config)
    if family is None:
        return None
    wanted = _plain(config.to_dict())
    return next((name for name in list_models(family) if _plain(model_config(name).to_dict()) == wanted), None)


def convert(src: PathLike, dst: PathLike, ema: bool = False) -> Path:
    """Load any supported checkpoint (``ema=True``: its EMA weights) and write it as an arvision checkpoint."""
    model = load_model(src, ema=ema)
    return save_model(model, dst, preset=matching_preset(model.config, model.family))


def load_tokenizer(source: PathLike, ema: bool = False, scale_factor: Optional[float] = None) -> Tokenizer:
    """A tokenizer from a published LlamaGen / MAR file or an arvision checkpoint directory (eval mode, CPU).

    ``source`` may also be a Hugging Face Hub id (``owner/name[@revision]``) of an arvision tokenizer repository
    (``arvision hub push``), downloaded with huggingface_hub as ``load_model`` does.
    ``ema``: read the EMA weights of an arvision directory. ``scale_factor``: override the KL latent scale."""
    path = Path(source)
    if is_hub_id(source):
        path = resolve_source(source, ema)
    if path.is_dir():
        model = load_model(path, ema=ema)
        if getattr(model, "family", None) not in TOKENIZER_FAMILIES:
            raise ValueError(f"{path} holds a {getattr(model, 'family', type(model).__name__)} model, not a "
                             f"tokenizer ({' or '.join(TOKENIZER_FAMILIES)})")
        if scale_factor is not None:
            if not isinstance(model, KLTokenizer):
                raise ValueError("scale_factor applies to continuous (KL) tokenizers only")
            model.config.scale_factor = float(scale_factor)
        return model.eval()
    return tokenizer_from_state_dict(read_published(path), scale_factor, source=str(path))


def load_segmentor(source, ema: bool = False) -> Segmentor:
    """A segmentor checkpoint, or one line saying that ``source`` holds another kind of model."""
    sd, family, config = read_family_checkpoint(source, ema)
    if family != "segmentor":
        raise ValueError(f"{source} is a {family} checkpoint, not a segmentor; train one first with `arvision segment "
                         f"train model.backbone_init={source}`")
    model = Segmentor(config)
    load_state_dict_checked(model, sd, f"checkpoint {source}")
    return model.eval()
