"""arvision: autoregressive vision in PyTorch (NEPA pretraining, probing, fine-tuning)."""
from .models import NepaConfig, NepaViT, create_model, list_models
from .checkpoints import convert, load_model, save_model
from .objectives import NepaLossConfig, nepa_loss

__version__ = "0.1.0"
__all__ = ["NepaConfig", "NepaViT", "NepaLossConfig", "convert", "create_model", "list_models", "load_model", "nepa_loss",
           "save_model"]
