"""Heptapod: class-conditional generation by next-2D-distribution prediction (arXiv 2510.06673; spec in
docs/heptapod_spec.md, every guessed choice a config field).

A causal transformer (the shared trunk) reads ``[class prefix; x_0 .. x_{N-2}]`` over raster-ordered visual tokens
and gives states h_0 .. h_{N-1}, where h_t has seen the class and x_0 .. x_{t-1}. At every timestep a **2D prediction
head** turns h_t into predictions z_{t,j} for grid positions j (docs/heptapod_spec.md §2.1, §3.3):

- ``global``: a bidirectional transformer over [Proj(h_t); q_0 .. q_{N-1}], q_j = mask token + position j;
- ``local``: the same queries attend to the context and, among themselves, only to a k x k spatial window
  (cross-attention and windowed self-attention, written as one masked attention over [context; queries]);
- ``none``: no 2D head, z_{t,t} = h_t: the plain next-token (LlamaGen-style) baseline.

``head_condition="prefix"`` conditions the head on h_0 .. h_t instead of h_t alone. ``head_queries="remaining"``
drops the queries of observed positions (j < t) from the global head: [Proj(h_t); q_t .. q_{N-1}], about half the
head tokens in training and sampling, predictions only for j >= t (issue 18's knob). z is then read by the
distribution head: logits over the codebook (VQ tokens) or the condition of a diffusion MLP (continuous latents).

    model = arvision.create_model("heptapod_tiny", codebook_size=1024, grid_size=8, num_classes=10)
    states = model.forward_backbone(tokens, labels)            # (B, N, D): h_0 .. h_{N-1}
    z = model.predict(states, t, grid=True)                    # (B K, N, D): z_{t,j} for timesteps t (B, K)
    z_next = model.predict(states, t)                          # (B K, D): z_{t,t}, what token t is drawn from
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from . import one_query_head
from .diffusion_mlp import DiffusionMLP
from .registry import ConfigDict, register_family, register_model
from .rope import Rope2D
from .transformer import KVCache, Transformer

HEAD_TYPES = ("global", "local", "none")


@dataclass
class HeptapodConfig(ConfigDict):
    token_type: str = "discrete"  # discrete (VQ code indices) | continuous (tokenizer latents)
    codebook_size: int = 16384  # discrete tokens
    latent_channels: int = 16  # continuous tokens
    grid_size: int = 16  # tokens per side: N = grid_size ** 2
    num_classes: int = 1000
    class_tokens: int = 1  # prefix length; MAR uses a 64-token buffer filled with the class embedding [G]
    embed_dim: int = 768
    depth: int = 12  # causal backbone blocks
    num_heads: int = 12
    head_type: str = "global"  # global | local | none (plain next-token baseline)
    head_depth: int = 12  # 2D head blocks (width embed_dim, bidirectional)
    head_condition: str = "state"  # state: h_t only [G default] | prefix: h_0 .. h_t
    local_window: int = 3  # k of the local head's k x k query window
    head_queries: str = "all"  # all: q_0 .. q_{N-1} | remaining: q_t .. q_{N-1} only (global head, state condition)
    pos_embed: str = "learned"  # learned absolute positions [G] | rope (2D RoPE, prefix unrotated)
    mlp_type: str = "gelu"
    qk_norm: str = "off"
    layerscale: Optional[float] = None
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    rope_theta: float = 100.0
    null_class: bool = True  # a "null class" embedding (index num_classes) so that CFG can be compared
    diffloss_depth: int = 6  # continuous tokens: residual AdaLN blocks of the diffusion MLP (MAR)
    diffloss_width: int = 1024

    def __post_init__(self):
        if self.token_type not in ("discrete", "continuous"):
            raise ValueError(f"token_type must be 'discrete' or 'continuous', got {self.token_type!r}")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {self.head_type!r}")
        if self.head_condition not in ("state", "prefix"):
            raise ValueError(f"head_condition must be 'state' or 'prefix', got {self.head_condition!r}")
        if self.head_queries not in ("all", "remaining"):
            raise ValueError(f"head_queries must be 'all' or 'remaining', got {self.head_queries!r}")
        if self.head_queries == "remaining" and (self.head_type != "global" or self.head_condition != "state"):
            raise ValueError("head_queries='remaining' needs head_type='global' and head_condition='state'")
        if self.pos_embed not in ("learned", "rope"):
            raise ValueError(f"pos_embed must be 'learned' or 'rope', got {self.pos_embed!r}")
        if self.class_tokens < 1:
            raise ValueError("class_tokens must be at least 1 (the class prefix gives h_0)")

    def summary(self) -> str:
        tok = f"VQ K={self.codebook_size}" if self.token_type == "discrete" else f"latent C={self.latent_channels}"
        return (f"D{self.embed_dim} L{self.depth}+{self.head_depth if self.head_type != 'none' else 0} "
                f"head={self.head_type} grid={self.grid_size}x{self.grid_size} {tok}")


class Heptapod(nn.Module):
    def __init__(self, config: Optional[HeptapodConfig] = None, **kwargs):
        super().__init__()
        cfg = self.config = config or HeptapodConfig(**kwargs)
        D, N, P = cfg.embed_dim, cfg.grid_size ** 2, cfg.class_tokens
        self.num_tokens, self.num_prefix = N, P
        trunk_args = dict(dim=D, num_heads=cfg.num_heads, mlp_type=cfg.mlp_type, qk_norm=cfg.qk_norm,
                          layerscale=cfg.layerscale, drop_path_rate=cfg.drop_path_rate, norm_eps=cfg.norm_eps)
        if cfg.token_type == "discrete":
            self.token_embed = nn.Embedding(cfg.codebook_size, D)
        else:
            self.token_embed = nn.Linear(cfg.latent_channels, D)
        self.class_embed = nn.Embedding(cfg.num_classes + int(cfg.null_class), D)
        self.prefix_pos = nn.Parameter(torch.zeros(1, P, D))  # tells the prefix slots apart
        self.pos_embed = nn.Parameter(torch.zeros(1, N, D)) if cfg.pos_embed == "learned" else None
        self.rope = (Rope2D(D // cfg.num_heads, cfg.grid_size, cfg.rope_theta, P).eval()
                     if cfg.pos_embed == "rope" else None)
        self.backbone = Transformer(depth=cfg.depth, **trunk_args)
        if cfg.head_type != "none":
            self.state_proj = nn.Linear(D, D)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
            self.query_pos = nn.Parameter(torch.zeros(1, N, D))
            self.head = Transformer(depth=cfg.head_depth, **trunk_args)
        if cfg.token_type == "discrete":
            self.logits = nn.Linear(D, cfg.codebook_size)
        else:
            self.denoiser = DiffusionMLP(cfg.latent_channels, D, cfg.diffloss_width, cfg.diffloss_depth)
        self.init_weights()
        self.register_load_state_dict_pre_hook(lambda module, sd, prefix, *args: _rename_denoiser_keys(sd, prefix))

    def checkpoint_filter_fn(self, state_dict: dict) -> dict:
        state_dict = dict(state_dict)
        _rename_denoiser_keys(state_dict)
        return state_dict

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one: each block of the backbone and of the 2D head, and each residual
        block of the diffusion MLP."""
        head = self.head.shard_units() if hasattr(self, "head") else []
        denoiser = list(self.denoiser.blocks) if hasattr(self, "denoiser") else []
        return [*self.backbone.shard_units(), *head, *denoiser]

    def init_weights(self):
        def _init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for name, child in self.named_children():
            if name != "denoiser":  # the diffusion MLP has its own (zero AdaLN) initialisation
                child.apply(_init)
        for p in (self.prefix_pos, self.pos_embed, getattr(self, "mask_token", None), getattr(self, "query_pos", None)):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        if isinstance(getattr(self, "logits", None), nn.Linear):  # uniform predictions at step 0 (LlamaGen)
            nn.init.zeros_(self.logits.weight)

    # ----------------------------------------------------------------------------------------- backbone
    def check_inputs(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        cfg = self.config
        if cfg.token_type == "discrete":
            if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise ValueError(f"a discrete-token Heptapod takes code indices, got {tokens.dtype} tokens")
        elif tokens.shape[-1] != cfg.latent_channels:
            raise ValueError(f"tokens have {tokens.shape[-1]} channels, the model expects {cfg.latent_channels}")
        # The value check reads the labels on the host: free on the CPU, a sync per step on a GPU, where it is skipped
        # (a token cache's labels define num_classes, so training data cannot be out of range).
        top = cfg.num_classes - (0 if cfg.null_class else 1)
        if labels.numel() and labels.device.type == "cpu" and (labels.min() < 0 or labels.max() > top):
            raise ValueError(f"class index out of range [0, {cfg.num_classes - 1}] (null class {cfg.num_classes}): "
                             f"got {labels.min().item()}..{labels.max().item()}")

    def embed_prefix(self, labels: torch.Tensor) -> torch.Tensor:
        return self.class_embed(labels)[:, None, :] + self.prefix_pos

    def embed_tokens(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Input embeddings of tokens at grid positions start .. start + T - 1 ((B, T) codes or (B, T, C))."""
        x = self.token_embed(tokens if self.config.token_type == "discrete" else tokens.to(self.token_embed.weight.dtype))
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, start:start + x.shape[1]]
        return x

    def _rope(self, start: int, length: int, dtype):
        if self.rope is None:
            return None
        cos, sin = self.rope(torch.float32 if torch.is_autocast_enabled() else dtype)
        return cos[start:start + length], sin[start:start + length]

    def forward_backbone(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """States h_0 .. h_{N-1} (B, N, D) of the token grid ``tokens`` ((B, N) codes or (B, N, C) latents)
        under teacher forcing: h_t has seen the class and tokens 0 .. t - 1."""
        P, N = self.num_prefix, tokens.shape[1]
        x = torch.cat([self.embed_prefix(labels), self.embed_tokens(tokens[:, :N - 1])], dim=1)
        h = self.backbone.forward_trunk(x, self._rope(0, x.shape[1], x.dtype), causal=True)
        return h[:, P - 1:]

    def new_cache(self, batch_size: int, device=None, dtype=None) -> KVCache:
        return self.backbone.new_kv_cache(batch_size, self.num_prefix + self.num_tokens, device, dtype)

    def step_backbone(self, cache: KVCache, labels: Optional[torch.Tensor] = None,
                      tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decoding: the prefill (``labels``) or the next input token(s) through the cached backbone; returns the
        state after the last position fed (B, D)."""
        start = cache.length
        x = self.embed_prefix(labels) if tokens is None else self.embed_tokens(tokens, start - self.num_prefix)
        h = self.backbone.forward_trunk(x, self._rope(start, x.shape[1], x.dtype), causal=True, kv_cache=cache)
        return h[:, -1]

    # --------------------------------------------------------------------------------------------- head
    def head_attention_mask(self, context: int, device, context_mask: Optional[torch.Tensor] = None):
        """Attention mask of the head's [context; queries] sequence (None = all attend to all): the local head's
        windows, and with ``context_mask`` (M, S) the valid context rows of each condition as keys."""
        cfg, N = self.config, self.num_tokens
        mask = None
        if cfg.head_type == "local":
            G, r = cfg.grid_size, cfg.local_window // 2
            rows, cols = torch.arange(N, device=device) // G, torch.arange(N, device=device) % G
            window = ((rows[:, None] - rows[None]).abs() <= r) & ((cols[:, None] - cols[None]).abs() <= r)
            mask = torch.ones(context + N, context + N, dtype=torch.bool, device=device)
            mask[:context, context:] = False  # the context does not read the queries
            mask[context:, context:] = window
        if context_mask is not None:
            keys = torch.cat([context_mask, context_mask.new_ones(context_mask.shape[0], N)], dim=1)
            keys = keys[:, None, None, :]  # (M, 1, 1, S + N)
            mask = keys if mask is None else mask[None, None] & keys
            mask = mask | torch.eye(context + N, dtype=torch.bool, device=device)  # no empty rows
        return mask

    def forward_prediction_head(self, states: torch.Tensor, context_mask: Optional[torch.Tensor] = None,
                                first: int = 0) -> torch.Tensor:
        """Predictions z (M, N, D) for every grid position, from M conditions: ``states`` (M, D) for h_t, or
        (M, S, D) for a prefix of states with ``context_mask`` (M, S) marking the valid ones (h_0 .. h_t).
        With ``head_queries="remaining"`` the M conditions share the timestep ``first`` = t and z (M, N - t, D) holds
        positions t .. N-1 only (the other queries are not in the head's input)."""
        if self.config.head_type == "none":
            raise ValueError("head_type='none' has no 2D head: the prediction for timestep t is h_t itself")
        ctx = self.state_proj(states if states.dim() == 3 else states[:, None])
        first = first if self.config.head_queries == "remaining" else 0
        q = (self.mask_token + self.query_pos[:, first:]).expand(ctx.shape[0], -1, -1).to(ctx.dtype)
        S = ctx.shape[1]
        mask = self.head_attention_mask(S, ctx.device, context_mask)
        z = self.head.forward_trunk(torch.cat([ctx, q], dim=1), attn_mask=mask)
        return z[:, S:]

    def head_constants(self, dtype: Optional[torch.dtype] = None) -> tuple:
        """The queries and their block-0 terms, the same for every condition (``one_query_head.head_constants``):
        computed once per sampling call and passed to ``forward_prediction_head_at``."""
        return one_query_head.head_constants(self, dtype)

    def forward_prediction_head_at(self, states: torch.Tensor, t: int, context_mask: Optional[torch.Tensor] = None,
                                   constants: Optional[tuple] = None) -> torch.Tensor:
        """z_{t,t} (M, D) alone: ``forward_prediction_head(states, context_mask)[:, t]`` up to float rounding, at a
        fraction of the cost, for sampling (``one_query_head.prediction_at``)."""
        return one_query_head.prediction_at(self, states, t, context_mask, constants)

    def predict(self, states: torch.Tensor, t: Union[int, torch.Tensor], grid: bool = False,
                constants: Optional[tuple] = None) -> torch.Tensor:
        """The prediction(s) of timestep t from the backbone's states: the one place that reads the head type
        (global / local / none) and what the head is conditioned on (h_t, or h_0 .. h_t; all or remaining queries).

        ``states``: (B, S, D), the states h_0 .. h_{S-1} of B sequences (S > t), or (B, D), h_t itself (when the
        head reads h_t alone). ``t``: an int, or (B,) / (B, K) timesteps per sequence, whose rows come out flattened
        (M = B K; the prefix condition repeats each sequence's states K times).
        Returns z_{t,t} (M, D), the prediction token t is drawn from, or with ``grid`` every prediction of the
        timestep, z_{t,j} (M, N, D) (positions j = t .. N-1 only, (M, N - t, D), with ``head_queries="remaining"``,
        which takes an int t). ``constants`` (``head_constants()``, an int t): z_{t,t} through the fast single-query
        head (``forward_prediction_head_at``), equal up to float rounding."""
        cfg = self.config
        if not isinstance(t, int) and t.dim() == 1:
            t = t[:, None]
        if states.dim() == 2:
            h_t = states
        elif isinstance(t, int):
            h_t = states[:, t]
        else:
            h_t = states[torch.arange(states.shape[0], device=t.device)[:, None].expand_as(t), t].flatten(0, 1)
        if cfg.head_type == "none":
            if grid:
                raise ValueError("head_type='none' has no 2D head: its only prediction for timestep t is h_t itself")
            return h_t
        if cfg.head_condition == "prefix":
            if states.dim() != 3:
                raise ValueError("a prefix-conditioned head reads h_0 .. h_t: pass the states (B, S, D)")
            if constants is not None:
                return self.forward_prediction_head_at(states[:, :t + 1], t, constants=constants)
            if not isinstance(t, int):
                states = states.repeat_interleave(t.shape[1], dim=0)
                t = t.flatten()[:, None]
            valid = torch.arange(states.shape[1], device=states.device)[None, :] <= t
            z = self.forward_prediction_head(states, valid.expand(states.shape[0], -1))
            first = 0
        elif constants is not None:
            return self.forward_prediction_head_at(h_t, t, constants=constants)
        else:
            first = t if cfg.head_queries == "remaining" else 0
            if not isinstance(first, int):
                raise ValueError("head_queries='remaining' predicts one timestep per call: pass an int t")
            z = self.forward_prediction_head(h_t, first=first)
        if grid:
            return z
        return z[:, t - first] if isinstance(t, int) else z[torch.arange(z.shape[0], device=z.device), t.flatten()]

def _rename_denoiser_keys(state_dict: dict, prefix: str = "") -> None:
    """Checkpoints written before the diffusion MLP was named ``denoiser`` (MAR's ``diffloss``) load unchanged."""
    for key in [k for k in state_dict if k.startswith(prefix + "diffloss.")]:
        state_dict[prefix + "denoiser." + key[len(prefix + "diffloss."):]] = state_dict.pop(key)


register_family("heptapod", Heptapod, HeptapodConfig, "Heptapod class-conditional generator (next 2D distribution)",
                train_command="heptapod train", used_by="`arvision sample`")


# CPU presets for 8x8 token grids (CIFAR-10 at /4); codebook / latent size and classes come from the token cache.
@register_model(family="heptapod")
def heptapod_tiny():
    return dict(grid_size=8, num_classes=10, codebook_size=1024, embed_dim=192, depth=6, num_heads=3, head_depth=3,
                diffloss_depth=3, diffloss_width=256)


@register_model(family="heptapod")
def heptapod_mini():  # the generation quick start's generator (4 + 2 blocks of width 128): minutes on a CPU
    return dict(grid_size=8, num_classes=10, codebook_size=512, embed_dim=128, depth=4, num_heads=4, head_depth=2,
                diffloss_depth=2, diffloss_width=256)


@register_model(family="heptapod")
def heptapod_small():
    return dict(grid_size=8, num_classes=10, codebook_size=1024, embed_dim=384, depth=8, num_heads=6, head_depth=4,
                diffloss_depth=3, diffloss_width=512)


# ImageNet 256 (16x16 KL-16 latents). Layouts: MAR-analogy reading of docs/heptapod_spec.md [I/G], not a released config.
def _imagenet(width: int, depth: int, heads: int, dl_depth: int, dl_width: int) -> dict:
    return dict(token_type="continuous", latent_channels=16, grid_size=16, num_classes=1000, embed_dim=width,
                depth=depth, num_heads=heads, head_depth=depth, diffloss_depth=dl_depth, diffloss_width=dl_width)


@register_model(family="heptapod")
def heptapod_b():
    return _imagenet(768, 12, 12, 6, 1024)


@register_model(family="heptapod")
def heptapod_l():
    return _imagenet(1024, 16, 16, 8, 1280)


@register_model(family="heptapod")
def heptapod_xl():  # not described by any source [G]: between L and H, DiT-XL's width
    return _imagenet(1152, 18, 16, 10, 1408)


@register_model(family="heptapod")
def heptapod_h():
    return _imagenet(1280, 20, 16, 12, 1536)
