"""Training-step time of the Heptapod 2D heads (global with all queries, with ``head_queries=remaining``, conditioned on
the prefix h_0..h_t; local) against the next-token baseline of the same backbone, measured side by side in one process (interleaved steps, so both see the same machine load); prints the ratio.

    python benchmarks/bench_heptapod_step.py                                   # heptapod_mini, 64 codes, batch 64
    python benchmarks/bench_heptapod_step.py --model heptapod_tiny --codebook 1024 --timesteps 4 --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch

import arvision
from arvision.objectives.heptapod import HeptapodLossConfig, HeptapodObjective


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="heptapod_mini")
    p.add_argument("--codebook", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--timesteps", type=int, default=2, help="K timesteps per image of the global head")
    p.add_argument("--target-set", default="all")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = {"next-token baseline (no head, every timestep)":
            (dict(head_type="none"), dict(target_set="next", timesteps_per_image=0)),
            f"global head, {args.target_set}, K={args.timesteps}":
            (dict(), dict(target_set=args.target_set, timesteps_per_image=args.timesteps)),
            f"global head, remaining queries and targets, K={args.timesteps}":
            (dict(head_queries="remaining"), dict(target_set="remaining", timesteps_per_image=args.timesteps)),
            f"global head conditioned on h_0..h_t (prefix), {args.target_set}, K={args.timesteps}":
            (dict(head_condition="prefix"), dict(target_set=args.target_set, timesteps_per_image=args.timesteps)),
            f"local head (3 x 3), local targets, K={args.timesteps}":
            (dict(head_type="local", local_window=3), dict(target_set="local", target_window=1,
                                                           timesteps_per_image=args.timesteps))}
    objs = {}
    for name, (model_args, loss_args) in runs.items():
        torch.manual_seed(0)
        model = arvision.create_model(args.model, codebook_size=args.codebook, **model_args)
        obj = HeptapodObjective(model, HeptapodLossConfig(**loss_args))
        objs[name] = (obj, torch.optim.AdamW(obj.parameters(), 1e-3))
    n = arvision.create_model(args.model).num_tokens
    tokens, labels = torch.randint(0, args.codebook, (args.batch, n)), torch.randint(0, 10, (args.batch,))
    times: dict[str, list[float]] = {k: [] for k in objs}
    for rep in range(args.repeats):
        for name, (obj, opt) in objs.items():
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = obj(tokens, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for k, v in med.items():
        print(f"{k}: {v:.3f} s/step (median of {args.repeats - 1}, batch {args.batch}, {args.threads} thread(s), bf16)")
    base, *heads = med.items()
    for name, value in heads:
        print(f"ratio {name} / next-token: {value / base[1]:.2f}")


if __name__ == "__main__":
    main()
