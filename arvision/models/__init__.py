from .registry import (
    build_from_config, count_parameters, create_model, family_of, get_family, list_families, list_models,
    model_config, register_family, register_model,
)
from .heptapod import Heptapod, HeptapodConfig
from .vit import NepaConfig, NepaViT
from . import tokenizers  # noqa: F401,E402  registers the vq_tokenizer / kl_tokenizer families
from . import segmentation  # noqa: F401,E402  registers the segmentor family
from . import timm_classifier  # noqa: F401,E402  registers the timm_classifier family

__all__ = ["Heptapod", "HeptapodConfig", "NepaConfig", "NepaViT", "build_from_config", "count_parameters", "create_model", "family_of",
           "get_family", "list_families", "list_models", "model_config", "register_family", "register_model"]
