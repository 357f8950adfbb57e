"""Measuring helpers of the benchmarks: device synchronisation, exact FLOP counts, the machine's matmul peak, the
memory a training step keeps, and the attention kernels timed alone (``bench_pretrain.py --attention-only``)."""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from arvision.models import layers as arv_layers


ATTENTION_SHAPES = ((16, 3, 65, 64), (16, 6, 65, 64), (8, 6, 197, 64), (8, 12, 257, 64), (4, 12, 577, 64))


def attention_kernels(device: torch.device, repeats: int = 5) -> list[dict]:
    """Causal attention forward + backward under bf16 autocast (fp32 inputs, as after QK-Norm), median ms per call:
    the CPU flash kernel, torch's math SDPA backend and arvision's matmul path."""
    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def matmul(q, k, v):
        with arv_layers.attention_kernel("matmul"):
            return arv_layers.attention(q, k, v, is_causal=True)

    rows = []
    for shape in ATTENTION_SHAPES:
        q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
        row = {"shape": shape}
        for name, fn in (("flash", flash), ("math", math), ("matmul", matmul)):
            def once():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = fn(q, k, v)
                out.float().sum().backward()
            once()
            row[name] = 1e3 * median_seconds(once, device, repeats)
        rows.append(row)
        print(f"| {tuple(shape)} | {row['flash']:.1f} | {row['math']:.1f} | {row['matmul']:.1f} | "
              f"{row['flash'] / row['matmul']:.2f} |", flush=True)
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, calls: int = 1) -> float:
    """The median over ``repeats`` windows of the seconds ``calls`` calls of ``fn`` take, the device synchronised at
    each window's ends and nowhere inside."""
    windows = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        windows.append(time.perf_counter() - t0)
    return statistics.median(windows)


def count_flops(model: nn.Module, loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                images: torch.Tensor) -> int:
    """Exact FLOPs of one forward + backward (FlopCounterMode), on a copy of the model in fp32, eager."""
    model = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, images).backward()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], iters: int = 5) -> float:
    """Best FLOP/s of single square matmuls of the given sizes (the machine's practical matmul peak; the best
    single timing, since on a shared machine noise only slows a matmul down)."""
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b  # warm-up (library initialisation, kernel selection)
        for _ in range(iters):
            synchronize(device)
            t0 = time.perf_counter()
            a @ b
            synchronize(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def persistent_bytes(step) -> int:
    """Parameters, buffers, optimizer state and EMA copy of one side (what stays allocated between steps)."""
    model = step.model
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for s in step.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    ema = getattr(step, "ema", None)
    if ema is not None:
        tensors += list(ema.module.state_dict().values())
    tensors += list((getattr(step, "ema_state", None) or {}).values())
    return sum(t.numel() * t.element_size() for t in tensors)
