"""Heptapod sampling speed, two paths side by side on the same model, batch and seed.

``--compare head`` (default): today's reference 2D head (every query through every head block at every step,
``sample_tokens(..., fast=False)``) against the fast sampler (query t alone through the last head block, block 0's
query inputs once per call; the default); ``--compare cache``: the backbone's KV cache against recomputing the whole
prefix at every step. The two paths alternate in order over ``--repeats`` rounds and their outputs are checked to
agree (VQ tokens equal; latents within 1e-4 of the largest; "max diff": the fraction of tokens that differ, or that
relative difference); the models' weights are perturbed off their zero-initialised logits / AdaLN so that the outputs
depend on the head. The table gives the median seconds per batch, samples/s and the ratio.

Models: ``--preset`` at each of ``--grids``, or ``--models`` as ``preset:key=value:...`` specs separated by ``;``
(e.g. a B-shaped model of smaller depth: ``heptapod_b:grid_size=16:depth=2:head_depth=2``).

    python benchmarks/bench_sampling.py --threads 1 --heads none,global,local --models \
        "heptapod_tiny:grid_size=8;heptapod_b:grid_size=16:depth=2:head_depth=2:diffloss_depth=2"
    python benchmarks/bench_sampling.py --compare cache --threads 1                  # the KV cache
    python benchmarks/bench_sampling.py --device cuda --batch 64 --preset heptapod_b --grids 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import arvision
from arvision.generate.sample import SamplingConfig, keep_freed_host_memory, sample_tokens


def timed(fn, device, clock=time.perf_counter) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t0, out


def model_specs(args) -> list[tuple[str, dict]]:
    if not args.models:
        return [(args.preset, dict(grid_size=int(g))) for g in args.grids.split(",")]
    return parse_model_specs(args.models)


def parse_model_specs(text: str) -> list[tuple[str, dict]]:
    """``preset:key=value:...`` specs separated by ``;`` as (preset, overrides) pairs (integers read as int)."""
    specs = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        preset, *pairs = spec.split(":")
        overrides = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            overrides[key] = int(value) if value.lstrip("-").isdigit() else value
        specs.append((preset, overrides))
    return specs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", default="head", choices=["head", "cache"],
                   help="head: reference vs fast 2D head; cache: KV cache vs recomputation")
    p.add_argument("--preset", default="heptapod_tiny")
    p.add_argument("--grids", default="8,16", help="grid sizes (tokens per side)")
    p.add_argument("--models", help="';'-separated preset:key=value:... specs (instead of --preset / --grids)")
    p.add_argument("--heads", default="none,global", help="head types to measure")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--diffusion-steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: this process's CPU time (with --threads 1, what an idle core would take; steadier than "
                        "wall time on a shared, loaded machine)")
    p.add_argument("--default-allocator", action="store_true",
                   help="leave malloc's defaults (`arvision sample` keeps freed memory for reuse: keep_freed_host_memory)")
    p.add_argument("--out", help="write the rows as JSON")
    args = p.parse_args(argv)
    allocator = "default" if args.default_allocator or not keep_freed_host_memory() else "freed memory kept"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # (label of the slower path, of the faster path): the ratio is slow / fast
    slow_name, fast_name = ("reference head", "fast head") if args.compare == "head" else ("recompute", "cache")
    rows = []
    print(f"malloc: {allocator}; clock: {args.clock}; speed-up: ratio of the medians (per round: median; min-max)")
    print(f"| preset | head | tokens | batch | {slow_name} s/batch | {fast_name} s/batch | samples/s {slow_name} | "
          f"samples/s {fast_name} | speed-up | max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset, overrides in model_specs(args):
        for head in args.heads.split(","):
            torch.manual_seed(0)
            model = arvision.create_model(preset, **{**overrides, "head_type": head}).to(device, dtype).eval()
            with torch.no_grad():  # off the zero-initialised logits / AdaLN, so that the outputs depend on z
                for param in model.parameters():
                    param.add_(torch.randn_like(param) * 0.02)
            tokens = model.num_tokens
            labels = torch.arange(args.batch, device=device) % model.config.num_classes

            def run(fast: bool, r: int):
                if args.compare == "head":
                    cfg = SamplingConfig(diffusion_steps=args.diffusion_steps)
                    return sample_tokens(model, labels, cfg, seed=r, fast=fast)
                cfg = SamplingConfig(use_cache=fast, diffusion_steps=args.diffusion_steps)
                return sample_tokens(model, labels, cfg, seed=r)

            times = {True: [], False: []}
            diff = 0.0
            for r in range(args.repeats):
                outs = {}
                for fast in ((True, False) if r % 2 == 0 else (False, True)):
                    t, outs[fast] = timed(lambda: run(fast, r), device, clock)
                    times[fast].append(t)
                if model.config.token_type == "discrete":
                    diff = max(diff, float((outs[True] != outs[False]).float().mean()))
                    if dtype == torch.float32:
                        assert torch.equal(outs[True], outs[False]), f"{slow_name} and {fast_name} sampled different tokens"
                else:
                    scale = float(outs[False].abs().max().clamp(min=1e-12))
                    diff = max(diff, float((outs[True] - outs[False]).abs().max()) / scale)
                    if dtype == torch.float32:
                        assert diff < 1e-4, f"{slow_name} and {fast_name} sampled latents {diff:.2e} (relative) apart"
            fast_s, slow_s = statistics.median(times[True]), statistics.median(times[False])
            row = dict(compare=args.compare, preset=preset, overrides=overrides, head=head, tokens=tokens,
                       batch=args.batch, slow_s=slow_s, fast_s=fast_s, samples_per_s_slow=args.batch / slow_s,
                       samples_per_s_fast=args.batch / fast_s, speedup=slow_s / fast_s, max_diff=diff,
                       round_speedups=[a / b for a, b in zip(times[False], times[True])], allocator=allocator,
                       device=str(device), dtype=args.dtype, threads=torch.get_num_threads(), clock=args.clock)
            rows.append(row)
            print(f"| {preset} {model.config.summary()} | {head} | {tokens} | {args.batch} | {slow_s:.3f} | "
                  f"{fast_s:.3f} | {row['samples_per_s_slow']:.3f} | {row['samples_per_s_fast']:.3f} | "
                  f"{row['speedup']:.2f}x ({statistics.median(row['round_speedups']):.2f}; "
                  f"{min(row['round_speedups']):.2f}-{max(row['round_speedups']):.2f}) | "
                  f"{diff:.1e} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)

if __name__ == "__main__":
    main()
