"""The Heptapod 2D prediction head for one query: z_{t,t} alone, what sampling draws token t from, at a fraction of
the full head's cost (``Heptapod.forward_prediction_head_at``; equal to ``forward_prediction_head(...)[:, t]`` up to
float rounding).

The queries q_j = mask token + position j are the same for every condition, so their block-0 attention inputs are
computed once per sampling call (``head_constants``); the last block and the final norm run only for query t (the
other queries' outputs of the last block are never read; every position's keys and values are, but without a key
norm they are never projected: query t's key weights meet the normalised rows instead, ``_last_block_at``); a global
head over one state runs block 0's query rows in closed form (``_first_block_for_one_state``), and a local head runs
only the queries within its receptive field of query t (``_local_reach``). The functions read the model's head
layers (``state_proj``, ``mask_token``, ``query_pos``, ``head``), which stay on the model under their state-dict names.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import attention


class HeadConstants(NamedTuple):
    """What the head computes identically for every condition (``head_constants``), H heads of width d."""
    queries: torch.Tensor  # (1, N, D): q_j = mask token + position j
    query_inputs: tuple  # their block-0 attention inputs (q, k, v), each (1, H, N, d)
    log_normalizers: torch.Tensor  # (1, H, N): each query's logsumexp over the query keys (block 0)
    own: torch.Tensor  # (H, N, D): each query's attention over the query keys alone through block 0's projection
    own_total: torch.Tensor  # (N, D): ``own`` summed over the heads, plus the projection's bias
    proj_by_head: torch.Tensor  # (H, d, D): block 0's output projection, one slice per head


def head_constants(model, dtype: Optional[torch.dtype] = None) -> HeadConstants:
    """The queries, their block-0 attention inputs and the terms of ``_first_block_for_one_state``, the same for
    every condition. ``dtype``: that of the head's input (the state projection's output; under autocast its dtype).
    Computed once per sampling call and passed to ``prediction_at``."""
    if dtype is None:
        dtype = model.state_proj(model.query_pos[:, :1]).dtype
    queries = (model.mask_token + model.query_pos).to(dtype)
    q, k, v = _attention_inputs(model.head.blocks[0], queries)
    attn = model.head.blocks[0].attn
    logits = (q[0] @ k[0].transpose(-2, -1)) * attn.scale  # (H, N, N)
    D, H = queries.shape[-1], attn.num_heads
    proj_by_head = attn.proj.weight.view(D, H, attn.head_dim).permute(1, 2, 0).to(v.dtype)  # (H, d, D)
    own = torch.bmm(logits.softmax(-1).to(v.dtype) @ v[0], proj_by_head)  # (H, N, D)
    own_total = own.sum(0) if attn.proj.bias is None else own.sum(0) + attn.proj.bias
    return HeadConstants(queries, (q, k, v), logits.logsumexp(-1)[None], own, own_total, proj_by_head.contiguous())


def _first_block_for_one_state(model, ctx: torch.Tensor, constants: HeadConstants) -> torch.Tensor:
    """Block 0 of the global head over [one context row (M, 1, D); the N constant queries], without a mask.

    Each query i attends to the N constant keys and to the one context key c, so per head its attention output
    is w v_c + (1 - w) a_i, with a_i its (constant) attention over the query keys alone and w =
    sigmoid(q_i k_c * scale - logsumexp_j(q_i k_j * scale)): the query rows cost O(N H D) per condition up to
    the MLP instead of the projection's O(N D^2), and the same up to float rounding."""
    block = model.head.blocks[0]
    attn, M = block.attn, ctx.shape[0]
    q_q, k_q, v_q = constants.query_inputs
    q_c, k_c, v_c = _attention_inputs(block, ctx)
    # the context row: the ordinary attention over every key (its own, then the N query keys)
    q_row, v_row = q_c[:, :, 0], v_c[:, :, 0]  # (M, H, d)
    logits = torch.cat([(q_row * k_c[:, :, 0]).sum(-1, keepdim=True),
                        torch.bmm(q_row.transpose(0, 1), k_q[0].transpose(1, 2)).transpose(0, 1)], dim=-1)
    probs = (logits * attn.scale).softmax(dim=-1)  # (M, H, 1 + N)
    out_c = torch.baddbmm(probs[..., :1].transpose(0, 1) * v_row.transpose(0, 1), probs[..., 1:].transpose(0, 1), v_q[0])
    x_c = ctx + block.drop_path1(block.ls1(attn.proj(out_c.transpose(0, 1).reshape(M, 1, -1))))
    # the query rows: sum_h (1 - w) a_i + w v_c through the projection (w v_c for all heads as one batched product)
    weight = torch.sigmoid((q_q[0] @ k_c.transpose(-2, -1))[..., 0] * attn.scale - constants.log_normalizers)
    state = torch.bmm(v_row.transpose(0, 1), constants.proj_by_head).transpose(0, 1)  # (M, H, D)
    mixed = torch.baddbmm(constants.own_total, weight.transpose(1, 2), state)
    for h in range(attn.num_heads):
        mixed.addcmul_(weight[:, h, :, None], constants.own[h], value=-1)
    x_q = constants.queries + block.drop_path1(block.ls1(mixed))
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
                  constants: Optional[HeadConstants] = None) -> torch.Tensor:
    """z_{t,t} (M, D) alone, from ``states`` (M, D) h_t or (M, S, D) with ``context_mask`` (M, S) as
    ``forward_prediction_head``: its ``[:, t]`` up to float rounding (see the module docstring). ``constants``:
    ``head_constants(model)``, else computed here."""
    if model.config.head_type == "none":
        raise ValueError("head_type='none' has no 2D head: the prediction for timestep t is h_t itself")
    ctx = model.state_proj(states if states.dim() == 3 else states[:, None])
    M, S = ctx.shape[:2]
    constants = constants if constants is not None else head_constants(model, ctx.dtype)
    queries, query_inputs = constants.queries, constants.query_inputs
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
    row, blocks = S + t, model.head.blocks
    if last > 0 and S == 1 and mask is None and reach is None:  # block 0's terms are over all N queries
        x = _first_block_for_one_state(model, ctx, constants)
    else:  # block 0: the context's attention inputs beside the queries' constant ones
        x = torch.cat([ctx, queries.expand(M, -1, -1)], dim=1)
        q, k, v = (torch.cat([c, w.expand(M, -1, -1, -1)], dim=2)
                   for c, w in zip(_attention_inputs(blocks[0], ctx), query_inputs))
        if last == 0:  # a one-block head: row t alone
            x, q = x[:, row:row + 1], q[:, :, row:row + 1]
            mask = None if mask is None else mask[..., row:row + 1, :]
        x = _attention_outputs(blocks[0], x, q, k, v, mask)
    for block in blocks[1:last]:
        x = block(x, None, False, mask)
    if last > 0:
        x = _last_block_at(blocks[last], x, row, mask)
    return model.head.norm(x[:, 0])


def _last_block_at(block, x: torch.Tensor, row: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The last head block's output for row ``row`` of x (M, T, D) alone (M, 1, D), over the keys and values of
    every row (``mask``: the head's, or None).

    Without a key norm the keys and values are never projected: per head h, q k_j = (W_k^T q) . y_j + q . b_k
    (y = norm1(x); the second term is the same for every key and cancels in the softmax), and the attention's
    output sum_j p_j v_j = W_v (sum_j p_j y_j) + b_v, as the weights p sum to 1. This costs O(T H D) per
    condition instead of the projection's O(T D^2), the same up to float rounding."""
    attn, (M, D) = block.attn, (x.shape[0], x.shape[-1])
    if not isinstance(attn.k_norm, nn.Identity):  # the keys are normalised after their projection
        q, k, v = _attention_inputs(block, x, query_row=row)
        return _attention_outputs(block, x[:, row:row + 1], q, k, v, None if mask is None else mask[..., row:row + 1, :])
    H, d = attn.num_heads, attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    y = block.norm1(x)
    q = F.linear(y[:, row], weight[:D], None if bias is None else bias[:D]).view(M, H, d)
    q = attn.q_norm(q) * attn.scale
    key_weights = torch.bmm(q.transpose(0, 1), weight[D:2 * D].view(H, d, D)).transpose(0, 1)  # (M, H, D)
    logits = torch.bmm(key_weights, y.transpose(1, 2))  # (M, H, T)
    if mask is not None:  # (T, T) or (M, 1, T, T): row's keys, broadcast over the heads
        logits = logits.masked_fill(~mask[..., row, :], float("-inf"))
    mean = torch.bmm(logits.softmax(dim=-1), y)  # (M, H, D): sum_j p_j y_j per head
    out = torch.bmm(mean.transpose(0, 1), weight[2 * D:].view(H, d, D).transpose(1, 2)).transpose(0, 1)  # (M, H, d)
    if bias is not None:
        out = out + bias[2 * D:].view(H, d)
    x = x[:, row:row + 1] + block.drop_path1(block.ls1(attn.proj(out.reshape(M, 1, D))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


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
