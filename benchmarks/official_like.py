"""The official NEPA pretraining step, as the official code runs it, for throughput comparisons.

The model is ``tests/official_reference.py`` (an independent re-implementation of the official Hugging Face
``ViTNepaForPreTraining`` with the official module structure and state-dict keys), switched to the official
*default* attention path: HF ``_attn_implementation="sdpa"`` calls
``F.scaled_dot_product_attention(q, k, v, scale=d**-0.5, is_causal=True)`` on the non-contiguous (B, H, T, d) views
and makes the output contiguous (nepa_spec.md §2, §10.13). The eager path (explicit -inf mask, fp32 softmax) remains
available as ``attn_implementation="eager"``.

What one :meth:`OfficialStep.__call__` reproduces, per optimizer step (nepa_spec.md §4, §10.13-14):
  * HF AMP: ``torch.autocast(bf16)`` around the forward and loss (fp32 master weights, no grad scaler), or fp32;
  * the official module structure: separate q/k/v Linear layers (three matmuls), QK-Norm, RoPE applied to the patch
    tokens through split + cat (copies), cos/sin recomputed on every forward (with the train-time rescale draw),
    an fp32 residual stream under autocast (the fp32 CLS token promotes the bf16 conv output), LayerScale as
    separate multiplies, and the loss on F.normalize'd vectors;
  * ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` (HF's default ``max_grad_norm``, via accelerate);
  * HF ``adamw_torch``: ``torch.optim.AdamW`` with torch's default implementation choice (foreach on CUDA, the
    per-tensor loop on CPU; not fused), betas (0.9, 0.95), eps 1e-8, the official weight-decay groups;
  * HF's ``cosine`` schedule through ``LambdaLR`` (one ``scheduler.step()`` per step) and ``zero_grad(set_to_none)``;
  * optionally (``ema=True``) the official ``EnhancedTrainer`` weight EMA: a Python loop over the whole
    ``state_dict`` after every optimizer step, ema = d * ema + (1 - d) * param in fp32.

What it leaves out (all of it would make the official side slower, so leaving it out favours the official side):
the HF Trainer loop itself (callbacks, ``logging_nan_inf_filter``'s per-step ``isnan``/``isinf`` check, which is a
host sync every step, loss accumulation, ``accelerate`` wrappers), data loading (HF ``datasets`` with per-sample
PIL transforms) and host-to-device copies. Images are a fixed tensor already on the device, for both sides.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "official_reference.py"


def _load_reference():
    """tests/official_reference.py as a module (the one pytest may have imported already, if any)."""
    if "official_reference" in sys.modules:
        return sys.modules["official_reference"]
    if not _REFERENCE.is_file():
        raise FileNotFoundError(f"{_REFERENCE} is missing; the official-like benchmark needs the repository checkout")
    spec = importlib.util.spec_from_file_location("official_reference", _REFERENCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["official_reference"] = module
    spec.loader.exec_module(module)
    return module


ref = _load_reference()
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class SdpaSelfAttention(ref.ViTNepaSelfAttention):
    """The official self-attention through HF's ``sdpa_attention_forward`` (no mask, ``is_causal`` passed)."""

    def forward(self, hidden_states, position_embeddings):
        B, T, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, position_embeddings)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_prob if self.training else 0.0,
                                             scale=self.scaling, is_causal=self.is_causal and T > 1)
        return out.transpose(1, 2).contiguous().reshape(B, T, -1), None


def build_official(config: dict, attn_implementation: str = "sdpa") -> nn.Module:
    """An official-structure ``ViTNepaForPreTraining`` (or classifier) with the chosen attention path."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    model = ref.build(config)
    if attn_implementation == "sdpa":
        for module in model.modules():
            if type(module) is ref.ViTNepaSelfAttention:
                module.__class__ = SdpaSelfAttention  # same parameters, official default forward
    return model


def official_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The official decay rule (nepa_spec.md §4): no decay inside any LayerNorm or for names matching
    bias / layernorm / rmsnorm / layer_scale / norm / _norm; everything else (Linear/Conv weights, CLS) decays."""
    in_norm = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)
               for p, _ in m.named_parameters(recurse=False)}
    excluded = ("bias", "layernorm", "rmsnorm", "layer_scale", "norm", "_norm")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in in_norm or any(e in name for e in excluded) else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def hf_cosine_lambda(warmup_steps: int, total_steps: int):
    """HF ``get_cosine_schedule_with_warmup`` multiplier."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return f


class OfficialStep:
    """One official pretraining optimizer step on a batch: ``step(images)``; no host synchronisation."""

    def __init__(self, model: nn.Module, precision: str = "bf16", lr: float = 1e-4, weight_decay: float = 0.05,
                 clip_grad: float = 1.0, warmup_steps: int = 10, total_steps: int = 100_000,
                 ema: bool = False, ema_decay: float = 0.9999):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.model = model.train()
        self.device_type = next(model.parameters()).device.type
        self.bf16 = precision == "bf16"
        self.clip_grad = clip_grad
        self.params = [p for p in model.parameters() if p.requires_grad]
        # HF adamw_torch passes neither fused nor foreach: torch picks foreach on CUDA, the per-tensor loop on CPU.
        self.optimizer = torch.optim.AdamW(official_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95),
                                           eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, hf_cosine_lambda(warmup_steps, total_steps))
        self.ema_decay = ema_decay
        self.ema_state = None
        self.use_ema = ema

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(images)[0]

    @torch.no_grad()
    def _update_ema(self):
        state = self.model.state_dict()
        if self.ema_state is None:  # the official trainer deep-copies the model after the first optimizer step
            self.ema_state = {k: v.detach().clone().float() for k, v in state.items()}
            return
        for k, v in state.items():
            self.ema_state[k].mul_(self.ema_decay).add_(v.float(), alpha=1 - self.ema_decay)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        loss = self.loss(images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.use_ema:
            self._update_ema()
        return loss.detach()
