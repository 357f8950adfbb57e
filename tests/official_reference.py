"""An independent re-implementation of the official NEPA Hugging Face model (``models/vit_nepa``), written from
the specification (nepa_spec.md §1-§3, §5.1, §13), with the official module structure so that ``state_dict()`` has
exactly the official keys. It is driven by an official-style ``config.json`` dict.

It deliberately does not import arvision: the tests compare arvision against it.
Attention is the official *eager* path (explicit -inf causal mask, fp32 softmax); RoPE follows the DINOv3 code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACT = {"gelu": nn.GELU, "silu": nn.SiLU}


def official_config(**overrides) -> dict:
    """A full official config dict (the released NEPA-B/14 pretraining values unless overridden)."""
    cfg = {
        "architectures": ["ViTNepaForPreTraining"], "model_type": "vit_nepa",
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "hidden_act": "gelu", "use_gated_mlp": False, "image_size": 224, "patch_size": 14, "num_channels": 3,
        "qkv_bias": True, "qk_norm": True, "qk_norm_affine": False, "qk_norm_bias": False,
        "layerscale_value": 1e-5, "rope_theta": 100.0, "pos_embed_rescale": 2.0, "pos_embed_shift": None,
        "pos_embed_jitter": None, "layer_norm_eps": 1e-12, "is_causal": True, "drop_path_prob": 0.0,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "num_prompt_token": 0, "add_pooling_layer": True, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
        "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    }
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------------------------ embeddings

class ViTNepaPatchEmbeddings(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.image_size = config["image_size"]
        self.projection = nn.Conv2d(config["num_channels"], config["hidden_size"], kernel_size=config["patch_size"],
                                    stride=config["patch_size"])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError("input image size does not match the model (interpolate_pos_encoding is False)")
        x = self.projection(pixel_values.to(self.projection.weight.dtype))
        return x.flatten(2).transpose(1, 2)


class ViTNepaEmbeddings(nn.Module):
    def __init__(self, config: dict, use_mask_token: bool = False):
        super().__init__()
        D = config["hidden_size"]
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D)) if use_mask_token else None
        self.patch_embeddings = ViTNepaPatchEmbeddings(config)
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])

    def forward(self, pixel_values, bool_masked_pos=None):
        patches = self.patch_embeddings(pixel_values)
        B = patches.shape[0]
        clean = torch.cat((self.cls_token.expand(B, -1, -1), patches), dim=1)
        inputs = patches
        if bool_masked_pos is not None:
            m = bool_masked_pos.unsqueeze(-1).type_as(patches)
            inputs = patches * (1.0 - m) + self.mask_token.expand(B, patches.shape[1], -1) * m
        embeddings = torch.cat((self.cls_token.expand(B, -1, -1), inputs), dim=1)
        return clean, self.dropout(embeddings)


# ------------------------------------------------------------------------------------------------------ RoPE

def get_patches_center_coordinates(num_patches_h: int, num_patches_w: int, dtype, device) -> torch.Tensor:
    coords_h = torch.arange(0.5, num_patches_h, dtype=dtype, device=device) / num_patches_h
    coords_w = torch.arange(0.5, num_patches_w, dtype=dtype, device=device) / num_patches_w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * coords - 1.0  # (h*w, 2) as (y, x)


def augment_patches_center_coordinates(coords, shift=None, jitter=None, rescale=None):
    if shift is not None:
        coords = coords + torch.empty((1, 2), device=coords.device, dtype=coords.dtype).uniform_(-shift, shift)
    if jitter is not None:
        r = math.log(jitter)
        coords = coords * torch.empty((1, 2), device=coords.device, dtype=coords.dtype).uniform_(-r, r).exp()
    if rescale is not None:
        r = math.log(rescale)
        coords = coords * torch.empty(1, device=coords.device, dtype=coords.dtype).uniform_(-r, r).exp()
    return coords


class ViTNepaRopePositionEmbedding(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        inv_freq = 1 / config["rope_theta"] ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, pixel_values: torch.Tensor):
        h = pixel_values.shape[-2] // self.config["patch_size"]
        w = pixel_values.shape[-1] // self.config["patch_size"]
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            coords = get_patches_center_coordinates(h, w, torch.float32, pixel_values.device)
            if self.training:
                coords = augment_patches_center_coordinates(coords, self.config["pos_embed_shift"],
                                                            self.config["pos_embed_jitter"],
                                                            self.config["pos_embed_rescale"])
            angles = 2 * math.pi * coords[:, :, None] * self.inv_freq[None, None, :]  # (N, 2, d/4)
            angles = angles.flatten(1, 2).tile(2)  # [y, x, y, x]
            cos, sin = torch.cos(angles), torch.sin(angles)
        return cos.to(pixel_values.dtype), sin.to(pixel_values.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The official rotation of (..., T, d) by per-token angles; cos/sin are (T, d), 1/0 on unrotated tokens."""
    return x * cos + rotate_half(x) * sin


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotate the patch tokens only; the leading T - N (CLS) tokens are left as they are."""
    num_patches = sin.shape[-2]
    num_prefix = q.shape[-2] - num_patches
    q_prefix, q_patches = q.split((num_prefix, num_patches), dim=-2)
    k_prefix, k_patches = k.split((num_prefix, num_patches), dim=-2)
    q_patches = q_patches * cos + rotate_half(q_patches) * sin
    k_patches = k_patches * cos + rotate_half(k_patches) * sin
    return torch.cat((q_prefix, q_patches), dim=-2), torch.cat((k_prefix, k_patches), dim=-2)


# ------------------------------------------------------------------------------------------------- attention

class ViTNepaSelfAttention(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        D, H = config["hidden_size"], config["num_attention_heads"]
        self.num_heads, self.head_dim = H, D // H
        self.scaling = self.head_dim ** -0.5
        self.is_causal = config["is_causal"]
        self.query = nn.Linear(D, D, bias=config["qkv_bias"])
        self.key = nn.Linear(D, D, bias=config["qkv_bias"])
        self.value = nn.Linear(D, D, bias=config["qkv_bias"])
        self.dropout_prob = config["attention_probs_dropout_prob"]
        if config["qk_norm"]:
            affine = config["qk_norm_affine"]
            bias = affine and config["qk_norm_bias"]
            eps = config["layer_norm_eps"]
            self.q_norm = nn.LayerNorm(self.head_dim, eps=eps, elementwise_affine=affine, bias=bias)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=eps, elementwise_affine=affine, bias=bias)
        else:
            self.q_norm = self.k_norm = None

    def project(self, hidden_states, position_embeddings):
        """q, k, v as (B, H, T, d): projections, then QK-norm, then RoPE (the official order)."""
        B, T, _ = hidden_states.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def forward(self, hidden_states, position_embeddings):
        B, T, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, position_embeddings)
        # eager attention
        weights = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if self.is_causal:
            mask = torch.full((T, T), float("-inf"), dtype=torch.float32, device=q.device).triu(1)
            weights = weights + mask.to(weights.dtype)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=self.dropout_prob, training=self.training)
        out = torch.matmul(weights, v).transpose(1, 2).contiguous().reshape(B, T, -1)
        return out, weights


class ViTNepaSelfOutput(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.dense = nn.Linear(config["hidden_size"], config["hidden_size"])
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])

    def forward(self, hidden_states):
        return self.dropout(self.dense(hidden_states))


class ViTNepaAttention(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.attention = ViTNepaSelfAttention(config)
        self.output = ViTNepaSelfOutput(config)

    def forward(self, hidden_states, position_embeddings):
        out, weights = self.attention(hidden_states, position_embeddings)
        return self.output(out), weights


class ViTNepaLayerScale(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.lambda1 = nn.Parameter(config["layerscale_value"] * torch.ones(config["hidden_size"]))

    def forward(self, x):
        return x * self.lambda1


class ViTNepaDropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class ViTNepaIntermediate(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        D, F_ = config["hidden_size"], config["intermediate_size"]
        self.up_proj = nn.Linear(D, F_)
        self.gate_proj = nn.Linear(D, F_) if config["use_gated_mlp"] else None
        self.act = ACT[config["hidden_act"]]()

    def forward(self, x):
        if self.gate_proj is not None:
            return self.act(self.gate_proj(x)) * self.up_proj(x)
        return self.act(self.up_proj(x))


class ViTNepaOutput(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.dense = nn.Linear(config["intermediate_size"], config["hidden_size"])
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])
        self.layer_scale = ViTNepaLayerScale(config) if config["layerscale_value"] is not None else None

    def forward(self, x):
        x = self.dropout(self.dense(x))
        return self.layer_scale(x) if self.layer_scale is not None else x


class ViTNepaLayer(nn.Module):
    def __init__(self, config: dict, drop_path: float = 0.0):
        super().__init__()
        D, eps = config["hidden_size"], config["layer_norm_eps"]
        self.attention = ViTNepaAttention(config)
        self.layer_scale = ViTNepaLayerScale(config) if config["layerscale_value"] is not None else None
        self.drop_path = ViTNepaDropPath(drop_path)
        self.layernorm_before = nn.LayerNorm(D, eps=eps)
        self.layernorm_after = nn.LayerNorm(D, eps=eps)
        self.intermediate = ViTNepaIntermediate(config)
        self.output = ViTNepaOutput(config)

    def forward(self, hidden_states, position_embeddings):
        attn, weights = self.attention(self.layernorm_before(hidden_states), position_embeddings)
        if self.layer_scale is not None:
            attn = self.layer_scale(attn)
        hidden_states = hidden_states + self.drop_path(attn)
        mlp = self.output(self.intermediate(self.layernorm_after(hidden_states)))
        return hidden_states + self.drop_path(mlp), weights


class ViTNepaEncoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        L = config["num_hidden_layers"]
        rates = torch.linspace(0, config["drop_path_prob"], L).tolist()
        self.layer = nn.ModuleList([ViTNepaLayer(config, rates[i]) for i in range(L)])

    def forward(self, hidden_states, position_embeddings):
        attentions = []
        for layer in self.layer:
            hidden_states, weights = layer(hidden_states, position_embeddings)
            attentions.append(weights)
        return hidden_states, attentions


# ---------------------------------------------------------------------------------------------------- models

class ViTNepaModel(nn.Module):
    def __init__(self, config: dict, use_mask_token: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = ViTNepaEmbeddings(config, use_mask_token)
        self.rope_embeddings = ViTNepaRopePositionEmbedding(config)
        self.encoder = ViTNepaEncoder(config)
        self.layernorm = nn.LayerNorm(config["hidden_size"], eps=config["layer_norm_eps"])

    def forward(self, pixel_values, bool_masked_pos=None):
        """(last_hidden_state after the final LayerNorm, clean input embeddings, attention probabilities)."""
        clean, embeddings = self.embeddings(pixel_values, bool_masked_pos)
        position_embeddings = self.rope_embeddings(pixel_values)
        hidden, attentions = self.encoder(embeddings, position_embeddings)
        return self.layernorm(hidden), clean, attentions


class ViTNepaForPreTraining(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.vit_nepa = ViTNepaModel(config)

    def forward(self, pixel_values):
        """(loss, last_hidden_state, input_embedding_clean)."""
        hidden, clean, _ = self.vit_nepa(pixel_values)
        pred = F.normalize(hidden[:, :-1], dim=-1)
        target = F.normalize(clean.detach()[:, 1:], dim=-1)
        loss = -(pred * target).sum(dim=-1).mean()
        return loss, hidden, clean


class ViTNepaForImageClassification(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.num_labels = len(config["id2label"])
        self.vit_nepa = ViTNepaModel(config)
        D = config["hidden_size"]
        self.add_pooling_layer = config.get("add_pooling_layer", True)
        self.fc_norm = nn.LayerNorm(D, eps=config["layer_norm_eps"]) if self.add_pooling_layer else None
        self.classifier = nn.Linear(D, self.num_labels)

    def forward(self, pixel_values):
        hidden, _, _ = self.vit_nepa(pixel_values)
        if self.add_pooling_layer:
            num_patches = (self.config["image_size"] // self.config["patch_size"]) ** 2
            pooled = self.fc_norm(hidden[:, -num_patches:].mean(dim=1))
        else:
            pooled = hidden[:, -1]
        return self.classifier(pooled)


def build(config: dict) -> nn.Module:
    if "ViTNepaForImageClassification" in config.get("architectures", ()):
        return ViTNepaForImageClassification(config)
    return ViTNepaForPreTraining(config)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (norms, LayerScale and QK-Norm included), at scales that keep activations O(1),
    so that a wrong key mapping changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "cls_token" not in name and "mask_token" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # LayerNorm / QK-Norm weights, LayerScale
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g))
    return model
