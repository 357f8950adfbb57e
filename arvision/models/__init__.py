from .registry import create_model, list_models, model_config, register_model
from .vit import NepaConfig, NepaViT

__all__ = ["NepaConfig", "NepaViT", "create_model", "list_models", "model_config", "register_model"]
