"""Visual tokenizers: images <-> a grid of tokens (VQ codes or KL latents), for generators.

Two registered families, both saved and loaded like any arvision model (``save_model`` / ``load_model``):

- ``vq_tokenizer`` (VQTokenizer): LlamaGen's VQGAN with l2-normalised 8-d codes. Presets ``llamagen_vq16``
  (the published VQ-16, codebook 16384), ``llamagen_vq8``, ``vq_f4_32px`` (CIFAR-10, 8 x 8 codes), ``vq_f8_64px``.
- ``kl_tokenizer`` (KLTokenizer): MAR's / LDM's KL-VAE with 16-channel latents. Presets ``mar_kl16`` (the published
  KL-16), ``kl_f4_32px`` (CIFAR-10, 8 x 8 x 16 latents), ``kl_f8_64px``.

    import arvision
    tok = arvision.load_tokenizer("vq_ds16_c2i.pt")        # or "kl16.ckpt", or an arvision run directory
                                                           # (it lives in arvision.checkpoints)
    tokens = tok.encode(images)                            # images (B, 3, H, W) in [-1, 1]
    images = tok.decode(tokens)                            # unclamped
    tok = arvision.create_model("vq_f4_32px")              # a fresh one to train (arvision tokenizer train)

The common interface (encode / decode / token_type / codebook_size / latent_channels / scale_factor / grid_size)
is described in ``base.py``.
"""
from .base import Tokenizer
from .kl import DiagonalGaussian, KLConfig, KLTokenizer
from .published import (
    TOKENIZER_FAMILIES, kl_config_from_state_dict, read_published, tokenizer_from_state_dict, vq_config_from_state_dict,
)
from .quantize import DeadCodeRestart, VectorQuantizer, entropy_loss, perplexity
from .vq import VQConfig, VQTokenizer

__all__ = ["DeadCodeRestart", "DiagonalGaussian", "KLConfig", "KLTokenizer", "TOKENIZER_FAMILIES", "Tokenizer",
           "VQConfig", "VQTokenizer", "VectorQuantizer", "entropy_loss", "kl_config_from_state_dict",
           "perplexity", "read_published", "tokenizer_from_state_dict",
           "vq_config_from_state_dict"]
