"""Transformer building blocks shared by every model family (NEPA layout: nepa_spec.md §2).

Block (pre-norm):  h = x + DropPath(LS1 * Proj(Attn(LN1(x))));  x' = h + DropPath(LS2 * MLP(LN2(h))).
Attention: fused q/k/v projection with bias, QK-Norm shared across heads, 2D RoPE on the patch tokens,
then SDPA (causal, bidirectional or an explicit mask, chosen per call; an optional KV cache for decoding). MLP, LayerScale and DropPath come from timm.

Attention kernel (``attention``): on the CPU, for short sequences (at most ``SHORT_ATTENTION_MAX_T`` keys), causal or
bidirectional attention runs as two batched matmuls and a softmax in the input dtype (bf16 under autocast, softmax
accumulated in fp32 by the kernel), which is several times faster than torch's CPU flash kernel, whose backward is
slow at short T (measured in benchmarks/README.md); elsewhere, and for explicit masks, it is
``F.scaled_dot_product_attention``. ``with attention_kernel("sdpa"):`` forces SDPA inside the block
(``set_attention_kernel`` sets it for the process, e.g. from a benchmark's command line).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, SwiGLU
from torch import nn

from .rope import apply_rope_signed, signed_sin

QK_NORMS = ("off", "layernorm", "affine")
ATTENTION_KERNELS = ("auto", "sdpa", "matmul")
SHORT_ATTENTION_MAX_T = 640  # keys; measured on the CPU: 4-6x SDPA at 65, 2.4x at 257, 1.3x at 577 (benchmarks/README.md)
_kernel = "auto"
_causal_bias: dict = {}


def set_attention_kernel(kernel: str) -> str:
    """Choose the attention kernel: "auto" (matmul path on the CPU for short sequences, SDPA elsewhere), "sdpa" or
    "matmul" (always the matmul path where it applies). Returns the previous choice."""
    global _kernel
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    previous, _kernel = _kernel, kernel
    return previous


@contextmanager
def attention_kernel(kernel: str) -> Iterator[None]:
    """``with attention_kernel("sdpa"): ...``: the kernel for the block, the previous one restored after it."""
    previous = set_attention_kernel(kernel)
    try:
        yield
    finally:
        set_attention_kernel(previous)


def _causal_additive_mask(T: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(1, T, T) additive mask, 0 on and below the diagonal and -inf above, cached per (T, dtype, device)."""
    key = (T, dtype, device)
    mask = _causal_bias.get(key)
    if mask is None:
        mask = torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu(1)[None]
        if not torch.compiler.is_compiling():
            _causal_bias[key] = mask
    return mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              is_causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v for (B, H, T, d) q and (B, H, Tk, d) k, v: the matmul path (see the
    module docstring) where it pays, else ``F.scaled_dot_product_attention``."""
    B, H, T, d = q.shape
    Tk = k.shape[2]
    use_matmul = attn_mask is None and (not is_causal or T == Tk) and (
        _kernel == "matmul" or (_kernel == "auto" and q.device.type == "cpu" and Tk <= SHORT_ATTENTION_MAX_T))
    if not use_matmul:
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask,
                                              is_causal=is_causal, scale=scale)
    dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
    scale = d ** -0.5 if scale is None else scale
    q, k, v = (t.to(dtype).reshape(B * H, -1, d) for t in (q, k, v))
    if is_causal:  # scale, mask and q k^T in one kernel
        logits = torch.baddbmm(_causal_additive_mask(T, dtype, q.device), q, k.transpose(1, 2), alpha=scale)
    else:
        logits = torch.bmm(q, k.transpose(1, 2)) * scale
    out = torch.bmm(logits.softmax(dim=-1), v)
    return out.view(B, H, T, -1)
MLP_TYPES = ("gelu", "swiglu", "geglu")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: str = "off",
                 qk_norm_bias: bool = False, norm_eps: float = 1e-12):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if qk_norm == "off":
            self.q_norm = self.k_norm = nn.Identity()
        else:
            affine = qk_norm == "affine"
            # One (d,) norm per layer, shared by every head.
            self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps, elementwise_affine=affine,
                                       bias=affine and qk_norm_bias)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps, elementwise_affine=affine,
                                       bias=affine and qk_norm_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None, causal: bool = False,
                attn_mask: Optional[torch.Tensor] = None, kv_cache=None, layer: int = 0, return_attn: bool = False):
        """x (B, T, C). ``rope``: (cos, sin) of these T positions. ``attn_mask``: boolean, True = attend, (T, Tk)
        or broadcastable to (B, H, T, Tk); it overrides ``causal``. ``kv_cache``: earlier keys/values are read
        from it (layer ``layer``) and these appended, so queries sit at positions cache.length .. + T - 1."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            cos, sin = cos.to(q.dtype), signed_sin(sin.to(q.dtype))
            q, k = apply_rope_signed(q, cos, sin), apply_rope_signed(k.to(q.dtype), cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        Tk = k.shape[2]
        is_causal = causal and attn_mask is None and Tk == T
        if causal and attn_mask is None and Tk != T and T > 1:  # a chunk after cached positions
            attn_mask = offset_causal_mask(T, Tk, x.device)
        attn = None
        if return_attn:  # eager path: explicit mask, fp32 softmax, probabilities returned
            logits = (q.float() @ k.float().transpose(-2, -1)) * self.scale
            if is_causal:
                attn_mask = offset_causal_mask(T, Tk, x.device)
            if attn_mask is not None:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            attn = logits.softmax(dim=-1)
            out = (attn.to(v.dtype) @ v)
        else:
            out = attention(q, k, v, attn_mask, is_causal)
        out = self.proj(out.transpose(1, 2).reshape(B, T, C))
        return (out, attn) if return_attn else out


def offset_causal_mask(num_queries: int, num_keys: int, device=None) -> torch.Tensor:
    """(Tq, Tk) boolean mask, True = attend, for queries at positions Tk - Tq .. Tk - 1 over keys 0 .. Tk - 1."""
    q = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    return torch.arange(num_keys, device=device)[None, :] <= q


def build_mlp(dim: int, hidden: int, mlp_type: str) -> nn.Module:
    if mlp_type == "gelu":
        return Mlp(dim, hidden, act_layer=nn.GELU)
    if mlp_type in ("swiglu", "geglu"):  # act(gate(x)) * up(x), hidden size kept (no 2/3 rescale), as official
        return SwiGLU(dim, hidden, act_layer=nn.SiLU if mlp_type == "swiglu" else nn.GELU)
    raise ValueError(f"mlp_type must be one of {MLP_TYPES}, got {mlp_type!r}")


class Block(nn.Module):
    """``mlp_layer``: builds the MLP as ``mlp_layer(in_features=dim, hidden_features=mlp_hidden)`` (timm's hook);
    None builds the one ``mlp_type`` names."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, mlp_type: str = "gelu",
                 qkv_bias: bool = True, qk_norm: str = "off", qk_norm_bias: bool = False,
                 layerscale: Optional[float] = 1e-5, drop_path: float = 0.0, norm_eps: float = 1e-12,
                 mlp_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, qk_norm_bias, norm_eps)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = (build_mlp(dim, mlp_hidden, mlp_type) if mlp_layer is None
                    else mlp_layer(in_features=dim, hidden_features=mlp_hidden))
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope=None, causal: bool = True, attn_mask: Optional[torch.Tensor] = None,
                kv_cache=None, layer: int = 0, return_attn: bool = False):
        attn_out = self.attn(self.norm1(x), rope, causal, attn_mask, kv_cache, layer, return_attn)
        if return_attn:
            attn_out, probs = attn_out
        x = x + self.drop_path1(self.ls1(attn_out))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, probs) if return_attn else x
