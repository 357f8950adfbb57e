"""Raster autoregressive sampling from a Heptapod generator, with a KV cache in the causal backbone
(docs/heptapod_spec.md §5).

The class prefix is prefilled once; then, for t = 0 .. N-1, the 2D head turns h_t into z_{t,t}, token t is drawn
(VQ: softmax(logits / temperature) with top-k / top-p; latents: reverse diffusion with ``diffusion_steps`` and a
noise ``diffusion_temperature``) and fed back through the cache to give h_{t+1}. No classifier-free guidance by
default; ``cfg_scale`` != 1 runs the null class beside each sample, for comparisons only.

Randomness is per sample: sample ``i`` draws every random number it uses (its tokens' uniforms, its diffusion noise)
from its own generator, seeded by ``(seed, i)`` (``sample_seed``), so a sample does not depend on which batch, process
or GPU draws it, nor on the other samples beside it; ``indices`` names the samples of a batch (default 0 .. B-1).

    tokens = sample_tokens(model, labels, SamplingConfig(temperature=1.0, top_k=0), seed=0)
    more = sample_tokens(model, labels2, cfg, seed=0, indices=torch.arange(64, 128))      # samples 64 .. 127
    images = decode_tokens(tokenizer, tokens, model.config)           # (B, 3, H, W) in [-1, 1]
"""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .diffusion import DiffusionSampler


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # VQ logits
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    diffusion_steps: int = 100
    diffusion_temperature: float = 0.95  # MAR's no-CFG value
    diffusion_variance: str = "large"  # reverse-step variance: large (beta) | small (posterior beta tilde)
    cfg_scale: float = 1.0  # 1 = no guidance (the default: Heptapod uses none)
    use_cache: bool = True
    precision: str = "fp32"  # "bf16": autocast the networks (about 2x on a CPU with AVX512-BF16; logits stay fp32)

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def keep_freed_host_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (mmap threshold 64 MiB, trim threshold 256 MiB) instead of
    handing it back to the system at once. Each sampling step allocates and frees the same few-hundred-KB
    activations; by default they come back as fresh pages every step (about 75,000 page faults, a tenth of the time,
    per heptapod_tiny batch of 8 on the CPU). Process-wide, so ``arvision sample`` and the sampling benchmark call
    it, not ``sample_tokens``. Returns False (and changes nothing) off Linux / glibc, or where
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` already set these."""
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 64 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 256 << 20))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k, then nucleus (top-p) filtering: logits outside are set to -inf (the most likely token stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s own generator: numpy's SeedSequence of (seed, index), so that neighbouring
    indices or seeds give unrelated streams."""
    if seed < 0 or index < 0:
        raise ValueError(f"sampling seeds and sample indices must be >= 0, got seed {seed}, index {index}")
    high, low = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return int(high) << 32 | int(low)


class SampleNoise:
    """Random numbers for a batch in which row b comes only from sample ``indices[b]``'s own CPU generator
    (``sample_seed``). Every call advances each row's stream by the same amount, so a row's draws depend on its seed,
    its index and the sequence of calls (fixed by the model and the sampling settings), never on the batch."""

    def __init__(self, seed: int, indices: Sequence[int], device):
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]
        self.device = device

    def uniform(self, *shape: int) -> torch.Tensor:
        """(B, *shape) uniforms in [0, 1)."""
        return torch.stack([torch.rand(shape, generator=g) for g in self.generators]).to(self.device)

    def normal(self, *shape: int) -> torch.Tensor:
        """(B, *shape) standard normals."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(self.device)


def draw_categorical(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one index per row of ``probs`` (B, K) (non-negative, any total) from ``uniform`` (B,) in
    [0, 1): the first index whose cumulative mass exceeds ``uniform`` times the row's total. An index of zero
    probability (a filtered token) is never drawn."""
    probs = probs.float()
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, (uniform.float() * cdf[:, -1]).unsqueeze(-1), right=True)[:, 0]
    index = index.clamp_(max=probs.shape[-1] - 1)
    # rounding can land u * total on the total: then the last index of positive mass
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).float().argmax(dim=-1)
    return torch.where(probs.gather(-1, index[:, None])[:, 0] > 0, index, last)


def _sharded_head(model) -> bool:
    """Whether the 2D head's blocks are FSDP2 shard units: their parameters are gathered only around the block's own
    forward, which the fast head (reading block 0's and the last block's layers directly) does not call."""
    blocks = getattr(getattr(model, "head", None), "blocks", ())
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return False
    return any(isinstance(block, FSDPModule) for block in blocks)


class _Predictor:
    """z_{t,t} from the backbone state h_t through ``Heptapod.predict``, holding what sampling keeps between steps: the
    states h_0 .. h_t that a prefix condition reads, and the fast head's constants.

    The fast path (``fast``) gives the reference path's z up to float rounding: the head runs query t alone through
    its last block (``Heptapod.forward_prediction_head_at``), block 0's query inputs are computed once per call, and a
    prefix condition passes only the valid states h_0 .. h_t (the reference masks the others out as keys; their own
    rows are never read)."""

    def __init__(self, model, batch: int, device, dtype, fast: bool = True):
        self.model, cfg = model, model.config
        fast = fast and not _sharded_head(model)
        prefix = cfg.head_type != "none" and cfg.head_condition == "prefix"
        self.states = torch.zeros(batch, model.num_tokens, cfg.embed_dim, device=device, dtype=dtype) if prefix else None
        self.constants = model.head_constants() if fast and cfg.head_type != "none" else None

    def __call__(self, h: torch.Tensor, t: int) -> torch.Tensor:
        if self.states is None:
            return self.model.predict(h, t, constants=self.constants)
        self.states[:, t] = h
        return self.model.predict(self.states, t, constants=self.constants)


@torch.no_grad()
def sample_tokens(model, labels: torch.Tensor, config: Optional[SamplingConfig] = None, seed: Optional[int] = None,
                  indices: Optional[Sequence[int]] = None, fast: bool = True) -> torch.Tensor:
    """Token grids for ``labels`` (B,): (B, N) codes or (B, N, C) latents, in raster order. Row b is sample
    ``indices[b]`` (default b) of the run seeded by ``seed`` (default 0): its randomness is that sample's own.
    ``fast=False`` runs the reference 2D head (every query through every head block at every step): the same
    tokens, the predictions equal up to float rounding; kept for tests and benchmarks."""
    cfg = config or SamplingConfig()
    mcfg = model.config
    device = next(model.parameters()).device
    model.check_inputs(torch.zeros(0, dtype=torch.long) if mcfg.token_type == "discrete"
                       else torch.zeros(0, mcfg.latent_channels), labels.cpu())  # once per call, on the host
    labels = labels.to(device)
    indices = list(range(labels.shape[0])) if indices is None else [int(i) for i in indices]
    if len(indices) != labels.shape[0]:
        raise ValueError(f"indices name {len(indices)} samples for {labels.shape[0]} labels")
    noise = SampleNoise(0 if seed is None else seed, indices, device)
    guided = cfg.cfg_scale != 1.0
    if guided and not mcfg.null_class:
        raise ValueError("cfg_scale != 1 needs a generator with a null class (null_class=true)")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        return _sample(model, labels, cfg, noise, guided, fast)[:labels.shape[0]]


def _sample(model, labels, cfg: SamplingConfig, noise: SampleNoise, guided: bool, fast: bool = True) -> torch.Tensor:
    mcfg, device = model.config, labels.device
    N = model.num_tokens
    run_labels = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    dtype = next(model.parameters()).dtype
    predict = _Predictor(model, run_labels.shape[0], device, dtype, fast)
    diffusion = DiffusionSampler() if mcfg.token_type == "continuous" else None
    shape = (run_labels.shape[0], N) if diffusion is None else (run_labels.shape[0], N, mcfg.latent_channels)
    tokens = torch.zeros(shape, dtype=torch.long if diffusion is None else dtype, device=device)
    cache = model.new_cache(run_labels.shape[0], device, dtype) if cfg.use_cache else None
    uniforms = noise.uniform(N) if diffusion is None else None  # (B, N): token t of row b from uniforms[b, t]
    h = model.step_backbone(cache, labels=run_labels) if cache is not None else None
    for t in range(N):
        if cache is None:  # recompute the whole prefix: h_t from the class and tokens 0 .. t-1
            h = model.forward_backbone(tokens[:, :t + 1], run_labels)[:, -1]
        z = predict(h, t)
        if diffusion is None:
            logits = model.logits(z).float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg.cfg_scale * (cond - uncond)
            logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
            nxt = draw_categorical(logits.softmax(dim=-1), uniforms[:, t])
            nxt = torch.cat([nxt, nxt]) if guided else nxt
        else:
            eps = noise.normal(diffusion.num_draws(cfg.diffusion_steps), mcfg.latent_channels)
            nxt = diffusion.sample(model.denoiser, z, mcfg.latent_channels, cfg.diffusion_steps,
                                   cfg.diffusion_temperature, cfg_scale=cfg.cfg_scale,
                                   variance=cfg.diffusion_variance, noise=eps).to(dtype)
            nxt = torch.cat([nxt, nxt]) if guided else nxt
        tokens[:, t] = nxt
        if cache is not None and t < N - 1:
            h = model.step_backbone(cache, tokens=tokens[:, t:t + 1])
    return tokens


def decode_tokens(tokenizer, tokens: torch.Tensor, model_config, scale_factor: float = 1.0) -> torch.Tensor:
    """Images (B, 3, H, W) in about [-1, 1] from sampled token grids, through the tokenizer's decoder.
    Continuous latents are divided by the ``scale_factor`` the token cache applied."""
    G = model_config.grid_size
    if model_config.token_type == "discrete":
        z = tokens.view(-1, G, G)
    else:
        z = tokens.view(tokens.shape[0], G, G, -1).permute(0, 3, 1, 2) / scale_factor
    return tokenizer.decode(z)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), the ADM .npz layout."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

