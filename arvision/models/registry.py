"""Registered model presets: ``create_model(name, **overrides)``, ``list_models()``."""
from __future__ import annotations

from typing import Callable

from .vit import NepaConfig, NepaViT

_PRESETS: dict[str, Callable[[], dict]] = {}


def register_model(fn: Callable[[], dict]) -> Callable[[], dict]:
    _PRESETS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_PRESETS)


def model_config(name: str, **overrides) -> NepaConfig:
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return NepaConfig.from_dict({**_PRESETS[name](), **overrides})


def create_model(name: str, **overrides) -> NepaViT:
    """Build a registered NEPA model; keyword overrides replace preset fields (e.g. num_classes=10)."""
    return NepaViT(model_config(name, **overrides))


# Official released configs (GELU MLP; base pretrain has parameter-free QK-Norm, large an affine one).
@register_model
def nepa_base_patch14_224():
    return dict(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, qk_norm="layernorm")


@register_model
def nepa_large_patch14_224():
    return dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16, qk_norm="affine")


# The paper's headline architecture: gated SiLU MLP (SwiGLU) with the official gated layout.
@register_model
def nepa_base_patch14_224_swiglu():
    return dict(nepa_base_patch14_224(), mlp_type="swiglu", qk_norm="affine")


@register_model
def nepa_large_patch14_224_swiglu():
    return dict(nepa_large_patch14_224(), mlp_type="swiglu")


# CPU and CIFAR-scale presets: 32x32 images, patch 4 (64 patches + CLS), head dim 64.
@register_model
def nepa_tiny_patch4_32():
    return dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, qk_norm="affine")


@register_model
def nepa_small_patch4_32():
    return dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6, qk_norm="affine")


# A small 224-pixel model for quick real-resolution runs.
@register_model
def nepa_small_patch14_224():
    return dict(img_size=224, patch_size=14, embed_dim=384, depth=12, num_heads=6, qk_norm="affine")
