"""NEPA pretraining throughput: arvision vs the official implementation's training step, side by side.

For each (model preset, precision) the script builds the arvision step and the official-like step
(``official_like.py``) from the *same* initial weights and times them interleaved in one process: after warm-up,
``--repeats`` rounds, each round running ``--steps`` optimizer steps of every side (order alternating between
rounds), with one device synchronisation at the end of each window and none inside. Throughput is the median
window's images/s. FLOPs per step are counted exactly with ``torch.utils.flop_counter.FlopCounterMode`` on one
forward + backward (attention counted as full T x T, as FlopCounterMode does), and MFU divides the achieved FLOP/s
by a measured matmul peak of the machine (and, on CUDA, by the H100 dense bf16 peak).

    python benchmarks/bench_pretrain.py                                   # CPU defaults: tiny + small, fp32 + bf16
    python benchmarks/bench_pretrain.py --device cuda --models nepa_base_patch14_224 --precision bf16 \\
        --compile off,on --batch-size 128 --steps 10 --repeats 5 --out base_h100.json

The arvision side is the step of ``arvision.train.engine.Trainer``: ``NepaObjective`` (nepa_loss plus its collapse
monitor) under bf16 autocast, ``clip_grad_norm_(1.0)``, AdamW from ``arvision.train.optim.build_adamw`` (fused on
CUDA and on the CPU) with per-step ``set_lr``, attention through ``arvision.models.layers.attention`` (the matmul path
on the CPU for short sequences); ``--compile on`` compiles the objective module (forward + loss;
backward through AOTAutograd), as ``train.compile=true`` does. ``--experiment`` adds monkeypatched arvision variants
(candidate optimisations; see EXPERIMENTS).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measuring import attention_kernels, count_flops, matmul_peak, persistent_bytes, synchronize  # noqa: E402
from official_like import OfficialStep, build_official  # noqa: E402

from arvision.checkpoints import arvision_config_to_official, arvision_to_official_state_dict  # noqa: E402
from arvision.models import layers as arv_layers  # noqa: E402
from arvision.models.registry import create_model, list_models, model_config  # noqa: E402
from arvision.models.vit import NepaViT  # noqa: E402
from arvision.objectives.nepa import NepaObjective  # noqa: E402
from arvision.train.distributed import clip_grad_norm  # noqa: E402
from arvision.objectives.param_groups import weight_decay_groups  # noqa: E402
from arvision.train.optim import build_adamw, set_lr  # noqa: E402

H100_BF16_DENSE = 989e12
DEFAULT_MODELS = ("nepa_tiny_patch4_32", "nepa_small_patch4_32")
LR, WEIGHT_DECAY, CLIP, WARMUP, TOTAL = 1e-4, 0.05, 1.0, 10, 100_000


# ------------------------------------------------------------------------------------------------ the two steps

class ArvisionStep:
    """One arvision trainer optimizer step on a batch (see the module docstring); no host synchronisation."""

    def __init__(self, model: NepaViT, precision: str = "bf16", compile: bool = False, fused: Optional[bool] = None,
                 ema: bool = False, compile_mode: Optional[str] = None):
        self.model = model.train()
        self.device_type = next(model.parameters()).device.type
        self.bf16 = precision == "bf16"
        self.objective = NepaObjective(model)
        self.loss_fn = torch.compile(self.objective, mode=compile_mode) if compile else self.objective
        groups = weight_decay_groups(model, LR, WEIGHT_DECAY, WARMUP)
        if fused is None:  # the trainer's choice
            self.optimizer = build_adamw(groups, device_type=self.device_type)
        else:  # same groups, the other implementation
            impl = dict(fused=True) if fused else dict(foreach=True)
            self.optimizer = torch.optim.AdamW([g | {"lr": 0.0} for g in groups], betas=(0.9, 0.95), eps=1e-8, **impl)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.ema = None
        if ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(model, decay=0.9999)
        self.step = 0

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.loss_fn(images)[0]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        set_lr(self.optimizer, self.step, TOTAL)
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, metrics = self.loss_fn(images)
        loss.backward()
        clip_grad_norm(self.params, CLIP)  # the trainer's
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()


def build_pair(preset: str, device: Union[torch.device, str] = "cpu", seed: int = 0,
               **overrides) -> tuple[NepaViT, nn.Module]:
    """The arvision model and the official-structure model (SDPA attention) with identical weights."""
    torch.manual_seed(seed)
    model = create_model(preset, **overrides)
    official = build_official(arvision_config_to_official(model.config), "sdpa")
    official.load_state_dict(arvision_to_official_state_dict(model.state_dict(), model.config))
    return model.to(device), official.to(device)


# ------------------------------------------------------------------------------------ experiments (monkeypatches)

def _attention_forward_qk_joint(self, x, rope=None, causal=False, attn_mask=None, kv_cache=None, layer=0,
                                return_attn=False):
    """Candidate: QK-Norm and RoPE applied to q and k in one op each (on the (B, T, 2, H, d) slice of the fused
    qkv output) instead of two, halving the element-wise kernel launches and the cos/sin casts."""
    if return_attn or attn_mask is not None or kv_cache is not None:
        return _ORIGINAL_ATTN_FORWARD(self, x, rope, causal, attn_mask, kv_cache, layer, return_attn)
    B, T, C = x.shape
    qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)
    qk, v = qkv[:, :, :2], qkv[:, :, 2]
    if not isinstance(self.q_norm, nn.Identity):
        qk = F.layer_norm(qk, (self.head_dim,), eps=self.q_norm.eps)
        if self.q_norm.weight is not None:
            w = torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None, :]
            qk = qk * w if self.q_norm.bias is None else torch.addcmul(
                torch.stack([self.q_norm.bias, self.k_norm.bias])[:, None, :], qk, w)
    if rope is not None:
        cos, sin = (t.to(qk.dtype)[:, None, None, :] for t in rope)  # (T, 1, 1, d) against (B, T, 2, H, d)
        x1, x2 = qk.chunk(2, dim=-1)
        qk = qk * cos + torch.cat((-x2, x1), dim=-1) * sin
    q, k = qk.transpose(1, 3).unbind(2)  # (B, H, T, d) each
    out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=causal)
    return self.proj(out.transpose(1, 2).reshape(B, T, C))


_ORIGINAL_ATTN_FORWARD = arv_layers.Attention.forward


@contextmanager
def _qk_joint():
    arv_layers.Attention.forward = _attention_forward_qk_joint
    try:
        yield
    finally:
        arv_layers.Attention.forward = _ORIGINAL_ATTN_FORWARD


EXPERIMENTS: dict[str, Callable[[], ContextManager]] = {
    "qk-joint": _qk_joint,
    # The attention kernel before the matmul path became the CPU default for short sequences: SDPA (CPU flash).
    "attn-sdpa": lambda: arv_layers.attention_kernel("sdpa"),
    # The math SDPA backend (matmul + softmax) instead of the CPU flash kernel, whose bf16 backward is slow at short T.
    "sdpa-math": lambda: sdpa_kernel(SDPBackend.MATH),
}


def experiment(name: Optional[str]) -> ContextManager:
    """The patch of one experiment, entered around each of its side's windows (patches are process-wide)."""
    return nullcontext() if name is None else EXPERIMENTS[name]()


# -------------------------------------------------------------------------------------------------- measuring

def arvision_flops(model: NepaViT, batch_size: int) -> int:
    """FLOPs of one training forward + backward at ``batch_size`` (counted at batch 1: every op is linear in B)."""
    size = model.config.img_size
    images = torch.randn(1, model.config.in_chans, size, size, device=next(model.parameters()).device)
    return batch_size * count_flops(model, lambda m, x: NepaObjective(m)(x)[0], images)


@dataclass
class Side:
    name: str
    step: Callable[[torch.Tensor], torch.Tensor]
    experiment: Optional[str] = None
    windows: list[float] = field(default_factory=list)
    peak_bytes: int = 0


def run_window(side: Side, images: torch.Tensor, steps: int, device: torch.device) -> float:
    with experiment(side.experiment):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            side.step(images)
        synchronize(device)
        return time.perf_counter() - t0


def measure(sides: list[Side], images: torch.Tensor, steps: int, repeats: int, warmup: int) -> None:
    """Warm up every side, then time ``repeats`` interleaved windows of ``steps`` steps each (order alternating)."""
    device = images.device
    for side in sides:
        run_window(side, images, warmup, device)
    for r in range(repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            side.windows.append(run_window(side, images, steps, device))
            if device.type == "cuda":  # this side's peak: others' persistent memory removed, its own kept
                own = persistent_bytes(side.step)
                side.peak_bytes = max(side.peak_bytes, torch.cuda.max_memory_allocated(device) - base + own)


# ------------------------------------------------------------------------------------------------------ driver

def build_sides(preset: str, precision: str, device: torch.device, compile_modes: list[bool],
                adamw: list[str], experiments: list[str], ema: bool, compile_mode: Optional[str],
                seed: int = 0) -> tuple[list[Side], NepaViT]:
    model, official = build_pair(preset, device, seed)
    sides = [Side("official", OfficialStep(official, precision, LR, WEIGHT_DECAY, CLIP, WARMUP, TOTAL, ema=ema))]
    for compiled in compile_modes:
        for impl in adamw or [None]:  # None: the trainer's choice (fused on CUDA and CPU)
            name = "arvision" + ("+compile" if compiled else "") + (f"+{impl}" if impl else "")
            step = ArvisionStep(copy.deepcopy(model), precision, compiled, None if impl is None else impl == "fused",
                                ema, compile_mode)
            sides.append(Side(name, step))
    for name in experiments:
        for compiled in compile_modes:
            step = ArvisionStep(copy.deepcopy(model), precision, compiled, None, ema, compile_mode)
            sides.append(Side("arvision" + ("+compile" if compiled else "") + f"+{name}", step, experiment=name))
    return sides, model


def benchmark_config(preset: str, precision: str, batch_size: int, device: torch.device, steps: int, repeats: int,
                     warmup: int, compile_modes: list[bool], adamw: list[str], experiments: list[str], ema: bool,
                     peaks: dict[str, float], compile_mode: Optional[str] = None) -> list[dict]:
    sides, model = build_sides(preset, precision, device, compile_modes, adamw, experiments, ema, compile_mode)
    flops = arvision_flops(model, batch_size)
    size = model.config.img_size
    images = torch.randn(batch_size, model.config.in_chans, size, size, device=device,
                         generator=torch.Generator(device).manual_seed(1))
    measure(sides, images, steps, repeats, warmup)
    peak = peaks[precision]
    rows = []
    base_ips = None
    for side in sides:
        med = statistics.median(side.windows)
        ips = batch_size * steps / med
        base_ips = base_ips or ips  # the official side comes first
        achieved = flops * steps / med
        rows.append(dict(
            device=device.type, model=preset, precision=precision, side=side.name, batch_size=batch_size,
            steps=steps, img_per_s=ips, img_per_s_min=batch_size * steps / max(side.windows),
            img_per_s_max=batch_size * steps / min(side.windows), ms_per_step=1e3 * med / steps,
            ratio_vs_official=ips / base_ips, flops_per_step=flops, achieved_flops=achieved,
            mfu_measured_peak=achieved / peak,
            mfu_h100_bf16=achieved / H100_BF16_DENSE if device.type == "cuda" and precision == "bf16" else None,
            peak_mem_mb=side.peak_bytes / 2 ** 20 if device.type == "cuda" else None,
            windows_s=side.windows))
    del sides
    return rows


def format_table(rows: list[dict]) -> str:
    cuda = bool(rows) and rows[0]["device"] == "cuda"
    head = ["model", "prec", "side", "B", "img/s (median)", "min-max", "ms/step", "x official", "TFLOP/s", "MFU"]
    if cuda:
        head += ["MFU/989T", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["precision"], r["side"], str(r["batch_size"]), f"{r['img_per_s']:.3g}",
                 f"{r['img_per_s_min']:.3g}-{r['img_per_s_max']:.3g}", f"{r['ms_per_step']:.1f}",
                 f"{r['ratio_vs_official']:.2f}", f"{r['achieved_flops'] / 1e12:.3f}",
                 f"{100 * r['mfu_measured_peak']:.1f}%"]
        if cuda:
            h100 = "-" if r["mfu_h100_bf16"] is None else f"{100 * r['mfu_h100_bf16']:.1f}%"
            cells += [h100, f"{r['peak_mem_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv(kind: Callable[[str], object], choices: Optional[tuple] = None):
    def parse(text: str) -> list:
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {choices}, got {text!r}")
        return items
    return parse


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", type=_csv(str, tuple(list_models())), default=list(DEFAULT_MODELS),
                   help="comma-separated presets (default: %(default)s)")
    p.add_argument("--precision", type=_csv(str, ("fp32", "bf16")), default=["fp32", "bf16"])
    p.add_argument("--compile", type=_csv(str, ("off", "on")), default=["off"],
                   help="arvision variants: off, on or off,on (torch.compile of the objective module)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune (default: default)")
    p.add_argument("--adamw", type=_csv(str, ("fused", "foreach")), default=[],
                   help="arvision AdamW implementations to compare, e.g. fused,foreach (default: the trainer's "
                        "choice, fused on CUDA and CPU)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: 16 for 32-pixel presets, 8 for 224 on CPU; 128 on CUDA)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per side (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--experiment", action="append", default=[], choices=sorted(EXPERIMENTS),
                   help="add a monkeypatched arvision variant (repeatable)")
    p.add_argument("--ema", action="store_true", help="both sides keep a weight EMA (the official default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--attention-only", action="store_true",
                   help="only time the attention kernels (flash, math SDPA, matmul path), fwd + bwd, bf16 autocast")
    args = p.parse_args(argv)
    if min(args.steps, args.repeats) < 1 or args.warmup < 0 or (args.batch_size or 1) < 1:
        p.error("--steps, --repeats and --batch-size must be >= 1, --warmup >= 0")
    return args


def default_batch(preset: str, device: torch.device) -> int:
    if device.type == "cuda":
        return 128
    return 8 if model_config(preset).img_size >= 224 else 16


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention_only:
        print("| (B, H, T, d) | flash ms | math SDPA ms | matmul path ms | flash / matmul |\n|---|---|---|---|---|")
        return attention_kernels(device)
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    peaks = {"fp32": matmul_peak(device, torch.float32, sizes), "bf16": matmul_peak(device, torch.bfloat16, sizes)}
    print(f"device {device} ({device_name(device)}, {torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"measured matmul peak: "
          f"fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s", flush=True)
    rows = []
    for preset in args.models:
        batch = args.batch_size or default_batch(preset, device)
        for precision in args.precision:
            new = benchmark_config(preset, precision, batch, device, args.steps, args.repeats, args.warmup,
                                   [c == "on" for c in args.compile], args.adamw, args.experiment, args.ema, peaks,
                                   args.compile_mode)
            print(format_table(new), flush=True)
            rows += new
    # The peak again at the end (the best of both): a measurement disturbed by other load would inflate the MFU.
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peak = max(peaks[precision], matmul_peak(device, dtype, sizes))
        for r in rows:
            if r["precision"] == precision:
                r["mfu_measured_peak"] = r["achieved_flops"] / peak
        peaks[precision] = peak
    print(f"\nmeasured matmul peak (best of start and end): fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s")
    print(format_table(rows))
    if device.type == "cpu":
        print(f"process max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (all sides)")
    if args.out:
        meta = dict(command=" ".join(sys.argv), torch=torch.__version__, device=str(device),
                    device_name=device_name(device),
                    threads=torch.get_num_threads(), peak_flops=peaks, h100_bf16_dense=H100_BF16_DENSE,
                    max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, args=vars(args) | {
                        "out": str(args.out)})
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
