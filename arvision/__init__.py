"""arvision: autoregressive vision in PyTorch (NEPA pretraining, probing, fine-tuning; visual tokenizers, Heptapod
generation, generative metrics, segmentation; model families that share one checkpoint format).

    model = arvision.create_model("nepa_tiny_patch4_32")
    arvision.save_model(model, "ckpt")                      # any registered family
    model = arvision.load_model("ckpt", family="nepa_vit")  # the stored family's class; one-line error for another
    tok = arvision.load_tokenizer("vq_ds16_c2i.pt")          # LlamaGen / MAR files as published, or arvision dirs
"""
from .models import NepaConfig, NepaViT, create_model, list_families, list_models
from .checkpoints import convert, export_official, load_model, load_tokenizer, load_weights, save_model
from .objectives import NepaLossConfig, nepa_loss

__version__ = "0.1.0"
__all__ = ["NepaConfig", "NepaViT", "NepaLossConfig", "convert", "create_model", "export_official", "list_families",
           "list_models", "load_model", "load_tokenizer", "load_weights", "nepa_loss", "save_model"]
