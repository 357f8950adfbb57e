"""Gaussian diffusion loss for one continuous token per position (MAR's diffusion loss; DDPM, Ho et al. 2020).

Training (eq. 14 of DDPM, epsilon prediction): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with t uniform over
``train_steps`` (1000) of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), loss ||eps - eps_theta(x_t, t, z)||^2.
MAR adds a learned-variance VLB term; here the reverse variance is fixed, and sampling (``generate/diffusion.py``)
picks it.

    diffusion = GaussianDiffusion()
    loss = diffusion.loss(mlp, x0, z)                   # (M,) per-token losses
"""
from __future__ import annotations

import math

import torch
from torch import nn


def cosine_alpha_bar(num_steps: int, s: float = 0.008) -> torch.Tensor:
    """abar_t for t = 0 .. T-1, from betas_t = min(1 - f(t+1)/f(t), 0.999), f(t) = cos^2((t/T + s)/(1 + s) pi/2)."""
    f = lambda t: math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


class GaussianDiffusion:
    def __init__(self, train_steps: int = 1000):
        self.train_steps = train_steps
        self.alpha_bar = cosine_alpha_bar(train_steps)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar.to(x0.device)[t].float()[:, None]
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def loss(self, denoiser: nn.Module, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per-token epsilon-prediction MSE (M,), averaged over channels, in fp32."""
        t = torch.randint(0, self.train_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0, dtype=torch.float32)
        x_t = self.q_sample(x0.float(), t, noise)
        eps = denoiser(x_t.to(cond.dtype), t, cond)
        return (eps.float() - noise).pow(2).mean(dim=-1)
