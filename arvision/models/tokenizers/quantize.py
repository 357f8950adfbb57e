"""Vector quantisation (VQ-VAE, van den Oord et al. 2017) with LlamaGen's l2-normalised low-dimensional codes.

    vq = VectorQuantizer(codebook_size=16384, dim=8, beta=0.25, l2_norm=True)
    out = vq(z)                 # z (B, 8, h, w) -> out.z_q (straight-through), out.indices (B, h, w), losses
    vq.lookup(indices)          # (B, 8, h, w) normalised codes for the decoder

Nearest neighbour by squared distance after l2-normalising both the encoder output and the codebook (so it is the
cosine-nearest code). Losses (VQ-VAE eq. 3): codebook ||sg[z] - e||^2, commitment beta * ||z - sg[e]||^2; the
optional entropy term of LlamaGen/MaskGIT (per-sample entropy minus entropy of the batch-mean assignment, softmax of
the negative distances at temperature 0.01) pushes towards confident, diverse assignments.

Usage statistics: ``codebook_used`` holds the code indices of the last ``usage_window`` encoded positions (the
buffer LlamaGen saves; -1 = empty), so ``usage()`` is the fraction of the codebook used recently. ``perplexity()``
is exp(entropy) of a batch's code histogram. ``DeadCodeRestart`` re-seeds codes unused for ``restart_after``
training steps from recent encoder outputs (the codebook-restart trick of Dhariwal et al. 2020, Jukebox).
All of these stay on the device (no host synchronisation).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor          # (B, D, h, w) quantised, straight-through gradient to z
    indices: torch.Tensor      # (B, h, w) long
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    entropy_loss: torch.Tensor
    z: torch.Tensor            # (B*h*w, D) the (normalised) encoder outputs that were matched, detached


def entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Mean per-sample entropy minus the entropy of the mean distribution of softmax(affinity / temperature)."""
    logits = affinity.float().reshape(-1, affinity.shape[-1]) / temperature
    probs = logits.softmax(-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    avg = probs.mean(0)
    avg_entropy = -(avg * torch.log(avg + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    return sample_entropy - avg_entropy


def perplexity(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """exp(entropy) of the code histogram of ``indices``: 1 if one code is used, codebook_size if all equally."""
    flat = indices.reshape(-1)
    counts = torch.zeros(codebook_size, device=flat.device, dtype=torch.float32)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, entropy_loss_ratio: float = 0.0,
                 l2_norm: bool = True, usage_window: int = 65536):
        super().__init__()
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.entropy_loss_ratio, self.l2_norm = entropy_loss_ratio, l2_norm
        self.embedding = nn.Embedding(codebook_size, dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # float, as in LlamaGen's checkpoints (indices < 2**24 are exact)
        self.register_buffer("codebook_used", torch.full((usage_window,), -1.0))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        B, D, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(-1, D)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        e = self.codebook()
        zf, ef = z.float(), e.float()
        d = zf.pow(2).sum(1, keepdim=True) + ef.pow(2).sum(1) - 2 * zf @ ef.t()
        indices = d.argmin(1)
        z_q = e[indices].to(z.dtype)
        zero = z.new_zeros((), dtype=torch.float32)
        if self.training:
            self.record_usage(indices)
            codebook_loss = (z_q.float() - z.detach().float()).pow(2).mean()
            commit_loss = self.beta * (z_q.detach().float() - z.float()).pow(2).mean()
            ent = self.entropy_loss_ratio * entropy_loss(-d) if self.entropy_loss_ratio > 0 else zero
        else:
            codebook_loss = commit_loss = ent = zero
        z_q = z + (z_q - z).detach()
        z_q = z_q.view(B, h, w, D).permute(0, 3, 1, 2).contiguous()
        return QuantizerOutput(z_q, indices.view(B, h, w), codebook_loss, commit_loss, ent, z.detach())

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> quantised latents (B, D, h, w)."""
        return self.codebook()[indices].permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def record_usage(self, indices: torch.Tensor) -> None:
        n, window = indices.numel(), self.codebook_used.numel()
        flat = indices.reshape(-1).to(self.codebook_used.dtype)
        if n >= window:
            self.codebook_used.copy_(flat[-window:])
        else:
            self.codebook_used[:-n] = self.codebook_used[n:].clone()
            self.codebook_used[-n:] = flat

    @torch.no_grad()
    def usage(self) -> torch.Tensor:
        """Fraction of the codebook among the last ``usage_window`` recorded codes (a 0-d tensor)."""
        used = torch.zeros(self.codebook_size + 1, device=self.codebook_used.device)
        idx = self.codebook_used.long().clamp(-1, self.codebook_size - 1)
        idx = torch.where(idx < 0, torch.full_like(idx, self.codebook_size), idx)  # empty slots -> spare bin
        used[idx] = 1.0
        return used[:-1].mean()


class DeadCodeRestart(nn.Module):
    """Re-seeds codes that no training step selected for ``restart_after`` steps with recent encoder outputs.

        restart = DeadCodeRestart(codebook_size, dim, restart_after=200)
        restart.observe(out.indices, out.z)     # every micro-batch (training)
        n = restart.step(quantizer)             # once per optimizer step: ages codes, re-seeds the dead ones

    State (code ages, a ring bank of ``bank_size`` recent encoder outputs) is in buffers, so it is saved with the
    training state. Under DDP the usage of all ranks is combined and rank 0's re-seeded codebook is broadcast, so
    the replicas stay identical.
    """

    def __init__(self, codebook_size: int, dim: int, restart_after: int, bank_size: int = 4096):
        super().__init__()
        if restart_after < 1:
            raise ValueError(f"restart_after must be >= 1 steps, got {restart_after}")
        self.restart_after = restart_after
        self.register_buffer("age", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("used", torch.zeros(codebook_size, dtype=torch.bool))
        self.register_buffer("bank", torch.zeros(bank_size, dim))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def observe(self, indices: torch.Tensor, z: torch.Tensor) -> None:
        self.used[indices.reshape(-1)] = True
        size = self.bank.shape[0]
        z = z.reshape(-1, z.shape[-1])[-size:].float()
        pos = (self.bank_ptr + torch.arange(z.shape[0], device=z.device)) % size
        self.bank[pos] = z
        self.bank_ptr.copy_((self.bank_ptr + z.shape[0]) % size)
        self.bank_count.copy_((self.bank_count + z.shape[0]).clamp(max=size))

    @torch.no_grad()
    def step(self, quantizer: VectorQuantizer) -> torch.Tensor:
        """Age the codes, re-seed the dead ones; returns the number re-seeded (a 0-d tensor)."""
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            used = self.used.to(torch.uint8)
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
            self.used.copy_(used.bool())
        self.age.copy_(torch.where(self.used, torch.zeros_like(self.age), self.age + 1))
        self.used.zero_()
        dead = (self.age >= self.restart_after) & (self.bank_count > 0)
        pick = (torch.rand(dead.shape[0], device=dead.device) * self.bank_count).long()
        seeds = self.bank[pick].to(quantizer.embedding.weight.dtype)
        weight = quantizer.embedding.weight
        if hasattr(weight, "full_tensor"):  # FSDP2: the codebook's rows are sharded over the processes
            from torch.distributed.tensor import distribute_tensor

            full = torch.where(dead[:, None], seeds, weight.full_tensor())
            dist.broadcast(full, src=0)  # rank 0's re-seeded codebook, as under DDP
            local = distribute_tensor(full, weight.device_mesh, weight.placements, src_data_rank=None)
            weight.to_local().copy_(local.to_local())
        else:
            weight.copy_(torch.where(dead[:, None], seeds, weight))
            if distributed:
                dist.broadcast(weight, src=0)
        self.age.masked_fill_(dead, 0)
        return dead.sum()
