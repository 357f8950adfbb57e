"""arvision: autoregressive vision in PyTorch (NEPA pretraining, probing, fine-tuning)."""
from .models import NepaConfig, NepaViT, create_model, list_models
from .objectives import NepaLossConfig, nepa_loss

__version__ = "0.1.0"
__all__ = ["NepaConfig", "NepaViT", "NepaLossConfig", "create_model", "list_models", "nepa_loss"]
