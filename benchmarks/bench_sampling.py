"""Heptapod sampling speed: the KV cache against recomputing the whole prefix at every step, side by side.

For each token count (64 = an 8x8 grid, 256 = 16x16) and head type, the same model samples the same batch with the
same seed both ways (the tokens are checked to be equal), alternating the order over ``--repeats`` rounds; the
table gives the median seconds per batch, samples/s and the cache's speed-up.

    python benchmarks/bench_sampling.py --threads 1                         # CPU
    python benchmarks/bench_sampling.py --device cuda --batch 64 --preset heptapod_b --grids 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import arvision
from arvision.generate.sample import SamplingConfig, sample_tokens


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="heptapod_tiny")
    p.add_argument("--grids", default="8,16", help="grid sizes (tokens per side)")
    p.add_argument("--heads", default="none,global", help="head types to measure")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="write the rows as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = []
    print(f"| preset | head | tokens | batch | cache s/batch | recompute s/batch | samples/s (cache) | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for grid in (int(g) for g in args.grids.split(",")):
        for head in args.heads.split(","):
            torch.manual_seed(0)
            model = arvision.create_model(args.preset, grid_size=grid, head_type=head).to(device, dtype).eval()
            labels = torch.arange(args.batch, device=device) % model.config.num_classes
            times = {True: [], False: []}
            outs = {}
            for r in range(args.repeats):
                for use_cache in ((True, False) if r % 2 == 0 else (False, True)):
                    cfg = SamplingConfig(use_cache=use_cache, diffusion_steps=20)
                    t, outs[use_cache] = timed(lambda: sample_tokens(model, labels, cfg, seed=r), device)
                    times[use_cache].append(t)
                if model.config.token_type == "discrete" and dtype == torch.float32:
                    assert torch.equal(outs[True], outs[False]), "cache and recomputation sampled different tokens"
            cache, plain = statistics.median(times[True]), statistics.median(times[False])
            row = dict(preset=args.preset, head=head, tokens=grid * grid, batch=args.batch, cache_s=cache,
                       recompute_s=plain, samples_per_s=args.batch / cache, speedup=plain / cache,
                       device=str(device), dtype=args.dtype, threads=torch.get_num_threads())
            rows.append(row)
            print(f"| {args.preset} | {head} | {grid * grid} | {args.batch} | {cache:.3f} | {plain:.3f} | "
                  f"{row['samples_per_s']:.2f} | {row['speedup']:.2f}x |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
