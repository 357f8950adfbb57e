"""The Heptapod 2D prediction head for one query: z_{t,t} alone, what sampling draws token t from, at a fraction of
the full head's cost (``Heptapod.forward_prediction_head_at``; equal to ``forward_prediction_head(...)[:, t]`` up to
float rounding).

The queries q_j = mask token + position j are the same for every condition, so their block-0 attention inputs are
computed once per sampling call (``head_constants``); the last block and the final norm run only for query t (the
other queries' outputs of the last block are never read, while every position's keys and values still are); a global
head over one state runs block 0's query rows in closed form (``_first_block_for_one_state``), and a local head runs
only the queries within its receptive field of query t (``_local_reach``). The functions read the model's head
layers (``state_proj``, ``mask_token``, ``query_pos``, ``head``), which stay on the model under their state-dict names.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .layers import attention


def head_constants(model, dtype: Optional[torch.dtype] = None) -> tuple:
    """What the head computes identically for every condition: the queries q_j = mask token + position j
    (1, N, D) and their block-0 attention inputs (q, k, v), each (1, H, N, d). ``dtype``: that of the head's
    input (the state projection's output; under autocast its dtype). Computed once per sampling call and
    passed to ``prediction_at``."""
    if dtype is None:
        dtype = model.state_proj(model.query_pos[:, :1]).dtype
    queries = (model.mask_token + model.query_pos).to(dtype)
    q, k, v = _attention_inputs(model.head.blocks[0], queries)
    # for _first_block_for_one_state: each query's log-normaliser over the query keys and its attention over
    # them through the output projection, per head
    attn = model.head.blocks[0].attn
    logits = (q[0] @ k[0].transpose(-2, -1)) * attn.scale  # (H, N, N)
    D, H = queries.shape[-1], attn.num_heads
    own = torch.einsum("hnd,chd->hnc", logits.softmax(-1).to(v.dtype) @ v[0],
                       attn.proj.weight.view(D, H, attn.head_dim).to(v.dtype))
    return queries, (q, k, v), (logits.logsumexp(-1)[None], own)


def _first_block_for_one_state(model, ctx: torch.Tensor, queries, query_inputs, terms) -> torch.Tensor:
    """Block 0 of the global head over [one context row (M, 1, D); the N constant queries], without a mask.

    Each query i attends to the N constant keys and to the one context key c, so per head its attention output
    is w v_c + (1 - w) a_i, with a_i its (constant) attention over the query keys alone and w =
    sigmoid(q_i k_c * scale - logsumexp_j(q_i k_j * scale)): the query rows cost O(N H D) per condition up to
    the MLP instead of the projection's O(N D^2), and the same up to float rounding."""
    block = model.head.blocks[0]
    attn, M = block.attn, ctx.shape[0]
    q_q, k_q, v_q = query_inputs
    q_c, k_c, v_c = _attention_inputs(block, ctx)
    # the context row: the ordinary attention over every key
    out_c = attention(q_c, torch.cat([k_c, k_q.expand(M, -1, -1, -1)], dim=2),
                      torch.cat([v_c, v_q.expand(M, -1, -1, -1)], dim=2))
    x_c = ctx + block.drop_path1(block.ls1(attn.proj(out_c.transpose(1, 2).reshape(M, 1, -1))))
    # the query rows
    lse, own = terms  # (1, H, N), (H, N, D): a_i through the projection
    weight = torch.sigmoid((q_q[0] @ k_c.transpose(-2, -1))[..., 0] * attn.scale - lse)  # (M, H, N)
    D, H = ctx.shape[-1], attn.num_heads
    state = torch.einsum("mhd,chd->mhc", v_c[:, :, 0], attn.proj.weight.view(D, H, attn.head_dim))  # (M, H, D)
    mixed = own.sum(0) + torch.einsum("mhn,mhc->mnc", weight, state) - torch.einsum("mhn,hnc->mnc", weight, own)
    if attn.proj.bias is not None:
        mixed = mixed + attn.proj.bias
    x_q = queries + block.drop_path1(block.ls1(mixed))
    x = torch.cat([x_c, x_q], dim=1)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _local_reach(model, t: int, device) -> Optional[torch.Tensor]:
    """The grid positions query t of the local head depends on, in order (None: every position, or not a local
    head). Through L windowed blocks of half-width r, output t reads the queries within L * r rows and columns
    of it (the context reads no query); each block needs one more window of inputs around the rows the next
    block reads, so this set gives z_{t,t} exactly."""
    cfg = model.config
    if cfg.head_type != "local":
        return None
    G, radius = cfg.grid_size, len(model.head.blocks) * (cfg.local_window // 2)
    if radius >= G - 1:
        return None
    positions = torch.arange(model.num_tokens, device=device)
    near = ((positions // G - t // G).abs() <= radius) & ((positions % G - t % G).abs() <= radius)
    return positions[near]


def prediction_at(model, states: torch.Tensor, t: int, context_mask: Optional[torch.Tensor] = None,
                  constants: Optional[tuple] = None) -> torch.Tensor:
    """z_{t,t} (M, D) alone, from ``states`` (M, D) h_t or (M, S, D) with ``context_mask`` (M, S) as
    ``forward_prediction_head``: its ``[:, t]`` up to float rounding (see the module docstring). ``constants``:
    ``head_constants(model)``, else computed here."""
    if model.config.head_type == "none":
        raise ValueError("head_type='none' has no 2D head: the prediction for timestep t is h_t itself")
    ctx = model.state_proj(states if states.dim() == 3 else states[:, None])
    M, S = ctx.shape[:2]
    queries, query_inputs, terms = constants if constants is not None else head_constants(model, ctx.dtype)
    mask = model.head_attention_mask(S, ctx.device, context_mask)
    last = len(model.head.blocks) - 1
    reach = _local_reach(model, t, ctx.device)
    if model.config.head_queries == "remaining":  # the queries of positions t .. N-1 are the head's input
        reach = torch.arange(t, model.num_tokens, device=ctx.device)
    if reach is not None:  # only the queries z_{t,t} depends on
        queries, query_inputs = queries[:, reach], tuple(w[:, :, reach] for w in query_inputs)
        if mask is not None:
            keep = torch.cat([torch.arange(S, device=ctx.device), S + reach])
            mask = mask.index_select(-2, keep).index_select(-1, keep)
        t = int((reach < t).sum())
    x = torch.cat([ctx, queries.expand(M, -1, -1)], dim=1)
    for i, block in enumerate(model.head.blocks):
        if 0 < i < last:
            x = block(x, None, False, mask)
            continue
        if i == 0 < last and S == 1 and mask is None and reach is None:  # its terms are over all N queries
            x = _first_block_for_one_state(model, ctx, queries, query_inputs, terms)
            continue
        row = S + t
        if i == 0:
            q, k, v = (torch.cat([c, w.expand(M, -1, -1, -1)], dim=2)
                       for c, w in zip(_attention_inputs(block, ctx), query_inputs))
        else:  # the last block: keys and values of every row, the query of row t
            q, k, v = _attention_inputs(block, x, query_row=row)
        if i == last:
            x = x[:, row:row + 1]
            q = q[:, :, row:row + 1] if i == 0 else q  # (a one-block head; else q is row t's already)
            mask = None if mask is None else mask[..., row:row + 1, :]
        x = _attention_outputs(block, x, q, k, v, mask)
    return model.head.norm(x[:, 0])


def _attention_inputs(block, x: torch.Tensor, query_row: Optional[int] = None):
    """A head block's (q, k, v) of rows x (B, T, D), each (B, H, T, d): norm1, the fused projection, QK-norm (the
    head has no RoPE). With ``query_row``, q is that row's alone (B, H, 1, d) and only k, v are projected for all."""
    attn, (B, T, D) = block.attn, x.shape
    x = block.norm1(x)
    if query_row is None:
        q, k, v = attn.qkv(x).view(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        weight, bias = attn.qkv.weight, attn.qkv.bias
        q = F.linear(x[:, query_row:query_row + 1], weight[:D], None if bias is None else bias[:D])
        q = q.view(B, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        kv = F.linear(x, weight[D:], None if bias is None else bias[D:])
        k, v = kv.view(B, T, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _attention_outputs(block, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The rest of ``block`` for rows x (B, T, D) with queries q (B, H, T, d) over keys / values k, v: what
    ``Block.forward`` computes for those rows."""
    B, T, C = x.shape
    out = block.attn.proj(attention(q, k, v, mask).transpose(1, 2).reshape(B, T, C))
    x = x + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
