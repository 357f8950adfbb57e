"""The shared transformer trunk: a stack of pre-norm blocks and a final norm, used by every model family.

The NEPA ViT, the generator's causal backbone and its bidirectional 2D prediction head are all this trunk with
different inputs. Attention per call is causal, bidirectional, or an explicit mask (prefix-LM, windows, cross-
attention by concatenation), and a `KVCache` gives step-by-step decoding with position offsets:

    trunk = Transformer(dim=192, depth=6, num_heads=3)
    h = trunk.forward_trunk(x, rope=(cos, sin), causal=True)                   # (B, T, D)
    cache = trunk.new_kv_cache(batch_size=4, max_len=65)
    h0 = trunk.forward_trunk(prefix, rope=rope_slice(0, 1), causal=True, kv_cache=cache)   # prefill
    h1 = trunk.forward_trunk(token, rope=rope_slice(1, 1), causal=True, kv_cache=cache)    # one step

Block selections (``parse_blocks``) have one grammar everywhere in arvision (CLI ``--blocks`` / ``--layers``,
feature specs, attention maps): an integer is one block index (negative counts from the end), a comma list selects
several, ``a:b`` is a Python slice (``-4:`` = the last four), and ``last``, ``middle`` (index depth // 2) and
``all`` name the obvious ones. Only ``NepaViT.forward_intermediates``, which keeps timm's name, keeps timm's
meaning: there an int n is the last n blocks.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Block

BlockSpec = Union[None, int, str, Sequence[int]]


class KVCache:
    """Keys and values of every layer for autoregressive decoding, preallocated to ``max_len`` positions.

    ``length`` is the number of positions already cached: the offset of the next chunk. The trunk writes each
    layer's keys/values through ``update`` and calls ``advance`` once all layers have run."""

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int, max_len: int,
                 device=None, dtype: torch.dtype = torch.float32):
        shape = (num_layers, batch_size, num_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._layers = [(self.k[i], self.v[i]) for i in range(num_layers)]  # per-layer views, indexed once
        self.max_len, self.length = max_len, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot append up to {end}")
        keys, values = self._layers[layer]
        keys.narrow(2, start, end - start).copy_(k)
        values.narrow(2, start, end - start).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


def parse_blocks(spec: BlockSpec, depth: int) -> list[int]:
    """0-based block indices (in the order given, duplicates dropped) of a block selection; see the module
    docstring for the grammar. Raises one ValueError line for an index out of range or an unreadable spec."""
    if spec is None:
        return list(range(depth))
    items: list = []
    if isinstance(spec, str):
        text = spec.strip().lower()
        named = {"all": list(range(depth)), "last": [depth - 1], "middle": [depth // 2]}
        if text in named:
            return named[text]
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if ":" in part:
                try:
                    bounds = [int(b) if b.strip() else None for b in part.split(":")]
                    items.extend(range(depth)[slice(*bounds)])
                except (ValueError, TypeError):
                    raise ValueError(f"cannot read block slice {part!r} in {spec!r}; use e.g. '-4:' or '2:6'") from None
                continue
            try:
                items.append(int(part))
            except ValueError:
                raise ValueError(f"cannot read blocks {spec!r}; use an index (3, -1), a comma list (2,3,-1), a slice "
                                 "(-4:), or last / middle / all") from None
    elif isinstance(spec, int):
        items = [spec]
    else:
        items = [int(i) for i in spec]
    out: list[int] = []
    for i in items:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"block {i} is out of range for a model with {depth} blocks (valid: {-depth}..{depth - 1})")
        if j not in out:
            out.append(j)
    if not out:
        raise ValueError(f"blocks {spec!r} select no block of a model with {depth} blocks")
    return out


class Transformer(nn.Module):
    """``depth`` pre-norm blocks (attention with QK-Norm and RoPE, MLP, LayerScale, DropPath) and a final norm.

    Built with keywords only. A model with one stack subclasses it (``NepaViT``: its ``blocks`` and ``norm`` sit at
    the model's root, as in the official layout) and passes its input layers as ``input_layers`` ({name: module or
    parameter}), registered before the blocks so that the state dict and the init draws read inputs -> blocks -> norm
    -> head; a model with several stacks holds one ``Transformer`` per role (Heptapod's ``backbone`` and ``head``).

    ``block_fn`` builds each block (timm's hook), called with the keywords of ``layers.Block``; a block's forward
    takes ``(x, rope, causal, attn_mask, kv_cache, layer, return_attn=False)`` as ``Block.forward`` does.
    ``mlp_layer`` builds each block's MLP as ``mlp_layer(in_features=dim, hidden_features=mlp_hidden)`` (timm's
    ``Mlp``, ``SwiGLU``, ``GluMlp`` fit); None: the MLP that ``mlp_type`` names."""

    def __init__(self, *, dim: int, depth: int, num_heads: int, mlp_hidden: Optional[int] = None,
                 mlp_type: str = "gelu", qkv_bias: bool = True, qk_norm: str = "off", qk_norm_bias: bool = False,
                 layerscale: Optional[float] = None, drop_path_rate: float = 0.0, norm_eps: float = 1e-6,
                 final_norm: bool = True, block_fn: Callable[..., nn.Module] = Block,
                 mlp_layer: Optional[Callable[..., nn.Module]] = None,
                 input_layers: Optional[dict[str, Union[nn.Module, nn.Parameter, None]]] = None):
        super().__init__()
        for name, layer in (input_layers or {}).items():
            setattr(self, name, layer)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            block_fn(dim=dim, num_heads=num_heads, mlp_hidden=mlp_hidden or 4 * dim, mlp_type=mlp_type,
                     mlp_layer=mlp_layer, qkv_bias=qkv_bias, qk_norm=qk_norm, qk_norm_bias=qk_norm_bias,
                     layerscale=layerscale, drop_path=dpr[i], norm_eps=norm_eps)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if final_norm else nn.Identity()
        self.grad_checkpointing = False

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (each all-gathered only around its own forward): every block."""
        return list(self.blocks)

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def new_kv_cache(self, batch_size: int, max_len: int, device=None, dtype: Optional[torch.dtype] = None) -> KVCache:
        attn = self.blocks[0].attn
        ref = attn.qkv.weight
        return KVCache(len(self.blocks), batch_size, attn.num_heads, attn.head_dim, max_len,
                       device or ref.device, dtype or ref.dtype)

    def run_blocks(self, x: torch.Tensor, rope=None, causal: bool = False, attn_mask: Optional[torch.Tensor] = None,
                   kv_cache: Optional[KVCache] = None, keep: Sequence[int] = (), stop: Optional[int] = None):
        """Blocks ``[0, stop)`` on ``x`` (B, T, D) -> (output before the final norm, [outputs of blocks in keep]).

        ``rope``: (cos, sin) tables (T, head_dim) for these T positions (already offset under a cache).
        ``attn_mask``: boolean (T, Tk) or broadcastable to (B, H, T, Tk), True = attend; overrides ``causal``.
        ``kv_cache``: keys/values of earlier positions are read from it and these T are appended."""
        kept = []
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for i, blk in enumerate(self.blocks[:stop]):
            if use_ckpt:
                x = checkpoint(blk, x, rope, causal, attn_mask, use_reentrant=False)
            else:
                x = blk(x, rope, causal, attn_mask, kv_cache, i)
            if i in keep:
                kept.append(x)
        if kv_cache is not None and stop is None:
            kv_cache.advance(x.shape[1])
        return x, kept

    def forward_trunk(self, x: torch.Tensor, rope=None, causal: bool = False, attn_mask: Optional[torch.Tensor] = None,
                      kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """All blocks, then the final norm."""
        x, _ = self.run_blocks(x, rope, causal, attn_mask, kv_cache)
        return self.norm(x)

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor, blocks: BlockSpec, rope=None, causal: bool = False,
                        attn_mask: Optional[torch.Tensor] = None) -> dict[int, torch.Tensor]:
        """Attention probabilities {block index: (B, H, T, T)} through the eager path (fp32 softmax)."""
        wanted = set(parse_blocks(blocks, len(self.blocks)))
        maps = {}
        for i, blk in enumerate(self.blocks[:max(wanted) + 1]):
            if i in wanted:
                x, maps[i] = blk(x, rope, causal, attn_mask, return_attn=True)
            else:
                x = blk(x, rope, causal, attn_mask)
        return maps
