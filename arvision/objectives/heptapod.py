"""The Heptapod objective: next 2D distribution prediction (docs/heptapod_spec.md §2.2).

    L = 1/|P| sum_{(t, j) in P} l(x_j ; z_{t,j}),   z_{t,j} = Head(h_t, position j)

over supervised (timestep, target) pairs P, with l the cross-entropy over the codebook for VQ codes (computed in
chunks, each recomputed in the backward pass, so full density does not hold every logit at once) or MAR's diffusion
loss for continuous latents. Knobs (defaults [G] where the paper is silent):

- ``target_set``: ``next`` (j = t: plain next-token prediction), ``local`` (remaining positions within
  ``target_window`` rows/columns of the next one), ``remaining`` (every j >= t), ``all`` (every j: the default,
  the abstract's "entire 2D spatial grid"; it trains every query at every timestep, measured better than
  ``remaining`` at equal steps in docs/generation.md);
- density: ``timesteps_per_image`` (K timesteps sampled per image, 0 = all N) and ``targets_per_timestep``
  (a random subset of each timestep's targets, 0 = all);
- ``averaging``: ``pairs`` (uniform over all pairs) or ``timestep`` (mean per timestep, then over timesteps).

A model with ``head_queries="remaining"`` (the head's input holds only the queries j >= t) takes ``remaining``,
``local`` or ``next`` targets; its K timesteps are drawn per batch rather than per image, so that each head call has
one query count and nothing is padded (``remaining_query_loss``).

Token grids are 0-indexed in raster order: h_t has seen tokens 0 .. t-1, so token t is "next".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..typed_config import ConfigDict
from .base import Objective
from .diffusion_loss import GaussianDiffusion
from .param_groups import weight_decay_groups

TARGET_SETS = ("next", "local", "remaining", "all")


@dataclass
class HeptapodLossConfig(ConfigDict):
    target_set: str = "all"
    target_window: int = 1
    timesteps_per_image: int = 4
    targets_per_timestep: int = 0
    averaging: str = "pairs"
    diffusion_batch_mul: int = 4  # noise draws per continuous target (MAR)
    label_dropout: float = 0.0  # > 0 trains the null class, for CFG comparisons only
    ce_chunk: int = 8192  # (timestep, target) pairs per cross-entropy chunk

    def __post_init__(self):
        if self.target_set not in TARGET_SETS:
            raise ValueError(f"objective.target_set must be one of {TARGET_SETS}, got {self.target_set!r}")
        if self.averaging not in ("pairs", "timestep"):
            raise ValueError(f"objective.averaging must be 'pairs' or 'timestep', got {self.averaging!r}")
        for key, low in (("target_window", 0), ("timesteps_per_image", 0), ("targets_per_timestep", 0),
                         ("diffusion_batch_mul", 1), ("ce_chunk", 1)):
            if getattr(self, key) < low:
                raise ValueError(f"objective.{key} must be >= {low}, got {getattr(self, key)}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"objective.label_dropout must be in [0, 1), got {self.label_dropout}")


def supervision_mask(timesteps: torch.Tensor, grid_size: int, target_set: str, window: int = 1) -> torch.Tensor:
    """(M, N) boolean: which target positions j each timestep t in ``timesteps`` (M,) supervises."""
    N = grid_size ** 2
    j = torch.arange(N, device=timesteps.device)[None, :]
    t = timesteps[:, None]
    if target_set == "next":
        return j == t
    if target_set == "all":
        return torch.ones(t.shape[0], N, dtype=torch.bool, device=t.device)
    remaining = j >= t
    if target_set == "remaining":
        return remaining
    near = ((j // grid_size - t // grid_size).abs() <= window) & ((j % grid_size - t % grid_size).abs() <= window)
    return remaining & near


def subsample(mask: torch.Tensor, keep: int, always: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Keep at most ``keep`` random True entries per row of ``mask``; entries of ``always`` (a subset of ``mask``,
    e.g. the next position j = t, the only prediction sampling uses) are always among them."""
    if keep <= 0 or keep >= mask.shape[1]:
        return mask
    scores = torch.rand(mask.shape, device=mask.device, generator=generator).masked_fill(~mask, 2.0)
    if always is not None:
        scores = scores.masked_fill(always & mask, -1.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return mask & (ranks < keep)


class HeptapodObjective(Objective):
    """``objective(tokens, labels) -> (loss, metrics)``; tokens (B, N) codes or (B, N, C) latents, raster order.
    Metric ``next_loss``: the loss on the j = t pairs, comparable across target sets."""

    def __init__(self, model, config: Optional[HeptapodLossConfig] = None):
        super().__init__()
        self.model = model
        self.config = config or HeptapodLossConfig()
        mcfg = model.config
        if mcfg.head_type == "none" and self.config.target_set != "next":
            raise ValueError("a model with head_type='none' predicts only the next token; set "
                             "objective.target_set=next or give the model a 2D head (model.args.head_type=global)")
        if mcfg.head_queries == "remaining" and self.config.target_set == "all":
            raise ValueError("a head without the observed positions' queries (head_queries=remaining) cannot predict "
                             "them: set objective.target_set=remaining (or local, next)")
        if self.config.label_dropout > 0 and not mcfg.null_class:
            raise ValueError("objective.label_dropout > 0 needs a model with null_class=true")
        self.diffusion = GaussianDiffusion() if mcfg.token_type == "continuous" else None

    def param_groups(self, lr: float, weight_decay: float, warmup_steps: int) -> list[dict]:
        # no weight decay on the diffusion MLP (MAR), biases, norms
        return weight_decay_groups(self, lr, weight_decay, warmup_steps,
                                   no_decay=lambda name: ".denoiser." in f".{name}")

    def sample_timesteps(self, batch: int, num: int, device) -> torch.Tensor:
        """(B, K) distinct timesteps per image (all N in order when K is 0 or >= N)."""
        K = self.config.timesteps_per_image
        if K <= 0 or K >= num:
            return torch.arange(num, device=device).expand(batch, num)
        return torch.rand(batch, num, device=device).argsort(dim=1)[:, :K]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor):
        model, cfg = self.model, self.config
        model.check_inputs(tokens, labels)
        if cfg.label_dropout > 0 and self.training:
            drop = torch.rand(labels.shape, device=labels.device) < cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, model.null_class), labels)
        B, N = tokens.shape[:2]
        states = model.forward_backbone(tokens, labels)  # (B, N, D)
        if model.config.head_queries == "remaining":
            return self.remaining_query_loss(states, tokens)
        t = self.sample_timesteps(B, N, tokens.device)  # (B, K)
        K = t.shape[1]
        rows = torch.arange(B, device=tokens.device)[:, None].expand(B, K)
        if model.config.head_type == "none":  # z_{t,t} = h_t; only the next target
            pred, target = model.predict(states, t), tokens[rows, t].flatten(0, 1)  # (B K, D)
            is_next = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
            weights = torch.full((pred.shape[0],), 1.0 / pred.shape[0], device=pred.device)
        else:
            z = model.predict(states, t, grid=True)  # (B K, N, D)
            t_flat = t.flatten()
            next_pos = torch.arange(N, device=t.device)[None, :] == t_flat[:, None]
            sup = subsample(supervision_mask(t_flat, model.config.grid_size, cfg.target_set, cfg.target_window),
                            cfg.targets_per_timestep, always=next_pos)
            pred = z[sup]
            target = tokens.repeat_interleave(K, dim=0)[sup]
            is_next = next_pos[sup]
            if cfg.averaging == "pairs":
                weights = torch.full((pred.shape[0],), 1.0 / pred.shape[0], device=z.device)
            else:
                per_row = sup.sum(dim=1, keepdim=True).clamp(min=1).float()
                weights = (1.0 / (per_row * sup.shape[0])).expand_as(sup)[sup]
        return self.weighted_loss(pred, target, is_next, weights)

    def weighted_loss(self, pred, target, is_next, weights):
        losses = self.pair_losses(pred, target)
        loss = (losses * weights).sum()
        with torch.no_grad():  # masked mean: no host sync
            nxt = is_next.float()
            metrics = {"next_loss": (losses.detach() * nxt).sum() / nxt.sum().clamp(min=1)}
        return loss, metrics

    def remaining_query_loss(self, states: torch.Tensor, tokens: torch.Tensor):
        """The loss of a head whose input holds only the queries of positions t .. N-1: the K sampled timesteps are
        shared by the batch (so each head call has one query count, without padding), the head runs once per
        timestep over [Proj(h_t); q_t .. q_{N-1}], and (t, j) pairs are weighted as in ``forward``."""
        model, cfg = self.model, self.config
        B, N = tokens.shape[:2]
        K = cfg.timesteps_per_image
        steps = torch.arange(N) if K <= 0 or K >= N else torch.randperm(N)[:K].sort().values
        preds, targets, nexts, counts = [], [], [], []
        for t in steps.tolist():
            z = model.predict(states, t, grid=True)  # (B, N - t, D): positions t .. N-1
            t_rows = torch.full((B,), t, device=tokens.device)
            sup = supervision_mask(t_rows, model.config.grid_size, cfg.target_set, cfg.target_window)[:, t:]
            next_pos = torch.zeros_like(sup)
            next_pos[:, 0] = True
            sup = subsample(sup, cfg.targets_per_timestep, always=next_pos)
            preds.append(z[sup])
            targets.append(tokens[:, t:][sup])
            nexts.append(next_pos[sup])
            counts.append(sup.sum(dim=1))
        pred, target, is_next = torch.cat(preds), torch.cat(targets), torch.cat(nexts)
        if cfg.averaging == "pairs":
            weights = torch.full((pred.shape[0],), 1.0 / pred.shape[0], device=pred.device)
        else:  # mean per (image, timestep), then over them; pairs are in (timestep, image, target) order
            per_row = torch.stack(counts, 0).clamp(min=1).float()  # (T, B)
            weights = (1.0 / (per_row * per_row.numel())).flatten().repeat_interleave(torch.stack(counts, 0).flatten())
        return self.weighted_loss(pred, target, is_next, weights)

    @torch.no_grad()
    def next_loss_by_position(self, tokens: torch.Tensor, labels: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Teacher-forced loss of the prediction sampling uses, z_{t,t}, at every grid position t (N,), averaged
        over the grids given: shows which positions a target set trains (under ``remaining`` the first rows'
        queries see the fewest (t, j) pairs)."""
        model = self.model
        total, constants = None, None
        for s in range(0, tokens.shape[0], chunk):
            x, y = tokens[s:s + chunk], labels[s:s + chunk]
            states = model.forward_backbone(x, y)  # (b, N, D)
            b, N = states.shape[:2]
            if model.config.head_type == "none":
                z = states.flatten(0, 1)
            else:  # the single-query head sampling uses: N head calls of one query, not N of N queries
                constants = constants if constants is not None else model.head_constants()
                z = torch.stack([model.predict(states, t, constants=constants) for t in range(N)], dim=1).flatten(0, 1)
            per = self.pair_losses(z, x.flatten(0, 1)).view(b, N).sum(0)
            total = per if total is None else total + per
        return total / tokens.shape[0]

    def pair_losses(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-pair losses (P,) in fp32: chunked cross-entropy for codes, the diffusion loss for latents."""
        model = self.model
        if self.diffusion is not None:
            m = self.config.diffusion_batch_mul
            per = self.diffusion.loss(model.denoiser, target.repeat(m, 1), pred.repeat(m, 1))
            return per.view(m, -1).mean(dim=0)
        head = model.logits

        def ce(z, y):
            return F.cross_entropy(head(z).float(), y, reduction="none")

        chunks = []
        for start in range(0, pred.shape[0], self.config.ce_chunk):
            z, y = pred[start:start + self.config.ce_chunk], target[start:start + self.config.ce_chunk].long()
            chunks.append(checkpoint(ce, z, y, use_reentrant=False) if torch.is_grad_enabled() else ce(z, y))
        return torch.cat(chunks) if chunks else pred.new_zeros(0)
