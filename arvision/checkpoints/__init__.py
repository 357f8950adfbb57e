"""Checkpoints: the arvision format, official NEPA (Hugging Face) checkpoints, and the load policy.

- ``arvision_format``: the arvision checkpoint directory (atomic writes, ``arvision.json`` with the model family).
- ``official_nepa``: official ``ViTNepa`` checkpoints <-> ``NepaViT`` (config and key mapping, export).
- ``loading``: resolving a path or Hub id, rebuilding the stored family's model, the fit check.

    model = load_model("SixAILab/nepa-base-patch14-224")          # Hub id, official directory or arvision directory
    model = load_model("runs/pretrain/last", family="nepa_vit", ema=True, causal=False)
    save_model(model, "ckpt")                                      # any registered family; atomic
    convert("nepa-base-patch14-224", "ckpt")                       # official -> arvision
"""
from .arvision_format import FORMAT, FORMAT_VERSION, atomic_directory, read_meta, read_weights_file, save_model
from .loading import (
    HEAD_KEYS, convert, describe, load_model, load_segmentor, load_state_dict_checked, load_tokenizer, load_weights,
    matching_preset, read_family_checkpoint,
)
from .official_nepa import (
    arvision_config_to_official, arvision_to_official_state_dict, export_official, official_config_to_arvision,
    official_to_arvision_state_dict, read_official,
)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "HEAD_KEYS", "arvision_config_to_official", "arvision_to_official_state_dict",
    "atomic_directory", "convert", "describe", "export_official", "load_model", "load_segmentor",
    "load_state_dict_checked", "load_tokenizer", "load_weights", "matching_preset", "official_config_to_arvision",
    "official_to_arvision_state_dict", "read_family_checkpoint", "read_meta", "read_official", "read_weights_file",
    "save_model",
]
