"""The NEPA causal Vision Transformer (arXiv 2512.16922; official layout in nepa_spec.md).

Conv2d patch embedding (no absolute position embedding), a CLS token at position 0, pre-norm blocks
with 2D RoPE / QK-Norm / LayerScale, and a final LayerNorm. The same backbone is used causally for
NEPA pretraining and bidirectionally for fine-tuning; the attention mode is chosen per call.

    model = arvision.create_model("nepa_base_patch14_224")
    tokens = model.forward_features(images)      # (B, 1 + N, D) after the final norm, CLS at index 0
    targets = model.embed(images)                # (B, 1 + N, D) raw embeddings: the NEPA targets
    grids = model.forward_intermediates(images, indices=4, intermediates_only=True)  # last 4 blocks, (B, D, H, W)

The block stack, final norm, attention modes and KV cache come from the shared trunk (transformer.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .layers import Block
from .registry import ConfigDict, register_family, register_model
from .rope import Rope2D
from .transformer import BlockSpec, Transformer, parse_blocks


@dataclass
class NepaConfig(ConfigDict):
    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: Optional[int] = None  # default 4 * embed_dim
    mlp_type: str = "gelu"  # gelu | swiglu | geglu
    qkv_bias: bool = True
    qk_norm: str = "layernorm"  # off | layernorm (no parameters) | affine (weight shared across heads)
    qk_norm_bias: bool = False
    layerscale: Optional[float] = 1e-5  # None disables LayerScale
    norm_eps: float = 1e-12
    rope_theta: float = 100.0
    rope_rescale: Optional[float] = 2.0  # train-time log-uniform coordinate rescale in [1/r, r]
    rope_shift: Optional[float] = None
    rope_jitter: Optional[float] = None
    drop_path_rate: float = 0.0
    causal: bool = True  # default attention mode when a call does not choose
    use_mask_token: bool = False  # learnable token for the random input-masking ablation
    num_classes: int = 0  # 0: no classifier head
    global_pool: str = "avg"  # avg: mean of patch tokens + fc_norm (official); last: last token, no fc_norm (not timm's
    # "token", which is the CLS token at position 0)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.global_pool not in ("avg", "last"):
            raise ValueError(f"global_pool must be 'avg' (mean of the patch tokens + fc_norm) or 'last' (the last "
                             f"token), got {self.global_pool!r}; timm's 'token' (the CLS token at position 0, which "
                             "sees only itself under causal attention) is not offered")

    def summary(self) -> str:
        return (f"embed_dim={self.embed_dim}, depth={self.depth}, num_heads={self.num_heads}, "
                f"mlp_type={self.mlp_type}, mlp_hidden={self.mlp_hidden or 4 * self.embed_dim}, "
                f"qk_norm={self.qk_norm}, layerscale={'on' if self.layerscale else 'off'}, "
                f"num_classes={self.num_classes}, patch_size={self.patch_size}")


class NepaViT(Transformer):
    """Patch embedding + CLS, the shared trunk (``blocks``, ``norm``), and the classifier head (timm API)."""
    num_prefix_tokens = 1
    classifier_keys = ("head.", "fc_norm.")  # the classifier: replaced when a classifier field changes on loading
    classifier_fields = ("num_classes", "global_pool")

    def checkpoint_filter_fn(self, state_dict: dict) -> dict:
        """A checkpoint without QK-Norm weights (the official base pretraining one) loaded into an affine QK-Norm
        model (a fine-tune config) starts them at weight 1 and bias 0, as the official init script."""
        if any(".attn.q_norm." in k or ".attn.k_norm." in k for k in state_dict):
            return state_dict
        fill = {k: torch.ones_like(v) if k.endswith(".weight") else torch.zeros_like(v)
                for k, v in self.state_dict().items() if ".attn.q_norm." in k or ".attn.k_norm." in k}
        return {**state_dict, **fill}

    def __init__(self, config: Optional[NepaConfig] = None, *, block_fn: Callable[..., nn.Module] = Block,
                 mlp_layer: Optional[Callable[..., nn.Module]] = None, **kwargs):
        """``config`` or its fields as keywords; ``block_fn`` / ``mlp_layer``: the trunk's hooks (``Transformer``)."""
        cfg = config or NepaConfig(**kwargs)
        D, grid_size = cfg.embed_dim, cfg.img_size // cfg.patch_size
        super().__init__(
            dim=D, depth=cfg.depth, num_heads=cfg.num_heads, mlp_hidden=cfg.mlp_hidden, mlp_type=cfg.mlp_type,
            qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm, qk_norm_bias=cfg.qk_norm_bias, layerscale=cfg.layerscale,
            drop_path_rate=cfg.drop_path_rate, norm_eps=cfg.norm_eps, block_fn=block_fn, mlp_layer=mlp_layer,
            input_layers=dict(
                patch_embed=nn.Conv2d(cfg.in_chans, D, kernel_size=cfg.patch_size, stride=cfg.patch_size),
                cls_token=nn.Parameter(torch.zeros(1, 1, D)),
                mask_token=nn.Parameter(torch.zeros(1, 1, D)) if cfg.use_mask_token else None,
                rope=Rope2D(D // cfg.num_heads, grid_size, cfg.rope_theta, self.num_prefix_tokens, cfg.rope_rescale,
                            cfg.rope_shift, cfg.rope_jitter)))
        self.config = cfg
        self.embed_dim = self.num_features = D
        self.grid_size, self.num_patches = grid_size, grid_size ** 2
        self.reset_classifier(cfg.num_classes, cfg.global_pool)
        self.init_weights()

    # ------------------------------------------------------------------ setup
    def init_weights(self):
        def _init(m):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_init)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self._zero_head()

    def _zero_head(self):
        if isinstance(self.head, nn.Linear):  # the official classifier starts at zero (nepa_spec.md §6)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def hub_tags(self) -> list[str]:
        """Tags of this model's Hugging Face Hub card (``arvision hub push``)."""
        return ["nepa", "image-classification" if self.config.num_classes else "image-feature-extraction"]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.config.num_classes = num_classes
        if global_pool is not None:
            self.config.global_pool = global_pool
        use_fc_norm = num_classes > 0 and self.config.global_pool == "avg"
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=self.config.norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._zero_head()

    def drop_mask_token(self) -> None:
        """Remove the masking-ablation token (unused outside NEPA pretraining); the config follows the weights."""
        self.mask_token = None
        self.config.use_mask_token = False

    # ---------------------------------------------------------------- forward
    def patch_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The (H, W) patch grid of images ``x``; any size that is a multiple of the patch size is accepted
        (RoPE places any grid on [-1, 1], so larger or non-square inputs need no interpolation)."""
        p = self.config.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"input images are {H}x{W}, not a multiple of the patch size {p}; resize or crop them "
                             f"(the model was trained at {self.config.img_size}x{self.config.img_size})")
        return H // p, W // p

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Raw embedding sequence cat(CLS, conv(x)): (B, 1 + N, D). No position, no norm."""
        self.patch_grid(x)
        patches = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        # cat promotes bf16 patches to the fp32 CLS dtype, as the official code: the residual stream stays fp32
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1)

    def rope_tables(self, tokens: torch.Tensor, grid: Optional[tuple[int, int]] = None):
        grid = grid or (self.grid_size, self.grid_size)
        if tokens.shape[1] != self.num_prefix_tokens + grid[0] * grid[1]:
            raise ValueError(f"{tokens.shape[1]} tokens do not match 1 CLS + a {grid[0]}x{grid[1]} patch grid; "
                             "pass grid=(H, W) for non-default inputs")
        return self.rope(tokens.dtype if not torch.is_autocast_enabled() else torch.float32, grid)

    def _causal(self, causal: Optional[bool]) -> bool:
        return self.config.causal if causal is None else causal

    def forward_tokens(self, tokens: torch.Tensor, causal: Optional[bool] = None,
                       grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Run the blocks and the final norm on an embedding sequence (B, 1 + N, D)."""
        return self.forward_trunk(tokens, self.rope_tables(tokens, grid), self._causal(causal))

    def forward_features(self, x: torch.Tensor, causal: Optional[bool] = None) -> torch.Tensor:
        return self.forward_tokens(self.embed(x), causal, self.patch_grid(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.config.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            x = x[:, -1]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, causal: Optional[bool] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, causal))

    def take_indices(self, indices: Union[None, int, Sequence[int]]) -> list[int]:
        """timm's block selection: None = every block, an int n = the last n, a sequence = those blocks (negative
        from the end); sorted, each once."""
        depth = self.depth
        if isinstance(indices, str):
            raise ValueError(f"indices={indices!r}: forward_intermediates takes None, an int (the last n blocks, as "
                             "timm) or a list of block indices; read a selection string with "
                             "arvision.models.transformer.parse_blocks(text, len(model.blocks)) first")
        if isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"indices={indices} asks for the last {indices} blocks of a model with {depth}; "
                                 f"give 1..{depth}, or a list of block indices")
            return list(range(depth - indices, depth))
        return sorted(parse_blocks(indices, depth))

    def forward_intermediates(self, x: torch.Tensor, indices: Union[None, int, Sequence[int]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              causal: Optional[bool] = None):
        """Block outputs, with the arguments and meaning of timm's ``VisionTransformer.forward_intermediates``.

        ``indices``: None = every block, an int n = the last n blocks, a list = those blocks (negative from the end);
        the outputs come in block order. The prefix (CLS) token is split off: each output is the patch grid
        (B, D, H, W) for ``output_fmt="NCHW"`` or the patch tokens (B, N, D) for "NLC", and with
        ``return_prefix_tokens`` a (patches, prefix (B, 1, D)) pair. ``norm`` applies the final norm to each;
        ``stop_early`` runs no block after the last one taken. Returns ``(final, outputs)``, ``final`` the normed
        output of the last block run (B, 1 + N, D), or only ``outputs`` with ``intermediates_only``.
        Beyond timm: ``causal`` chooses the attention (None: ``config.causal``); timm's ``output_dict``,
        ``attn_mask`` and ``is_causal`` are not offered."""
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        take = self.take_indices(indices)
        grid = self.patch_grid(x)
        tokens = self.embed(x)
        last, kept = self.run_blocks(tokens, self.rope_tables(tokens, grid), self._causal(causal), keep=take,
                                     stop=take[-1] + 1 if stop_early else None)
        if norm:
            kept = [self.norm(t) for t in kept]
        B, P = x.shape[0], self.num_prefix_tokens
        outputs = [t[:, P:] for t in kept]
        if output_fmt == "NCHW":
            outputs = [t.transpose(1, 2).reshape(B, -1, *grid) for t in outputs]
        if return_prefix_tokens:
            outputs = list(zip(outputs, [t[:, :P] for t in kept]))
        return outputs if intermediates_only else (self.norm(last), outputs)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, layers: BlockSpec = None,
                       causal: Optional[bool] = None) -> dict[int, torch.Tensor]:
        """Attention probabilities {block index: (B, H, T, T)} through the eager path (fp32 softmax)."""
        grid = self.patch_grid(x)
        h = self.embed(x)
        rope = self.rope(h.dtype, grid)
        return self.attention_probs(h, layers, rope, self._causal(causal))


register_family("nepa_vit", NepaViT, NepaConfig, "NEPA causal Vision Transformer (backbone and classifier)",
                train_command=lambda config: "finetune" if config.num_classes else "pretrain",
                used_by="`arvision eval knn | linear | attentive | classify`, `arvision visualize`, "
                        "`arvision finetune model.init=PATH`")


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
