"""Samples/s of this checkout's Heptapod sampler against an older arvision's, on the same weights, with identical
outputs checked: both sample greedily (top-k 1), so the two versions must draw the same tokens whatever their
random streams (issue 18's goal: >= 1.5x the global-head samples/s of the sampler it was filed against).

Each measurement is its own process (``--worker``), old and new alternating over ``--rounds``; a process samples
once to warm up, then times ``--repeats`` calls of ``sample_tokens`` by its own CPU time (``--clock cpu``, the
default: on a shared machine wall time measures the neighbours) or wall time. The weights are made once here (seed
0, perturbed off the zero-initialised logits as in ``bench_sampling.py``) and loaded by every worker, so a change
of parameter order between versions cannot change the model. This checkout's worker calls
``keep_freed_host_memory()`` as ``arvision sample`` does (``--default-allocator``: not; the old sampler had no such call).

    git archive 87d70bb arvision | tar -x -C /tmp/arvision_87d70bb     # the sampler before issue 18's work
    OMP_NUM_THREADS=1 python benchmarks/bench_sampler_versions.py --old /tmp/arvision_87d70bb \
        --models "heptapod_tiny:grid_size=8" --batch 8 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One measurement in this process: the package found first on ``args.package`` (or this checkout's)."""
    sys.path.insert(0, args.package or str(REPO))
    import torch
    from safetensors.torch import load_file

    import arvision
    from arvision.generate import sample as sampling

    torch.set_num_threads(1)
    if args.package is None and not args.default_allocator:
        sampling.keep_freed_host_memory()
    preset, overrides = json.loads(args.spec)
    model = arvision.create_model(preset, **overrides).eval()
    model.load_state_dict(load_file(args.weights), strict=True)
    labels = torch.arange(args.batch) % model.config.num_classes
    config = sampling.SamplingConfig(top_k=1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    tokens = sampling.sample_tokens(model, labels, config, seed=0)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = clock()
        tokens = sampling.sample_tokens(model, labels, config, seed=0)
        times.append(clock() - start)
    torch.save(tokens, args.tokens)
    print(json.dumps({"file": arvision.__file__, "seconds": times}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", help="directory holding the older `arvision` package (e.g. from git archive)")
    p.add_argument("--models", default="heptapod_tiny:grid_size=8", help="';'-separated preset:key=value:... specs")
    p.add_argument("--head", default="global")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="processes per version, alternating")
    p.add_argument("--repeats", type=int, default=1, help="timed sampling calls per process")
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    p.add_argument("--default-allocator", action="store_true")
    p.add_argument("--out", help="write the rows as JSON")
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--package", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.old or not (Path(args.old) / "arvision" / "__init__.py").is_file():
        p.error(f"--old must be a directory holding an arvision package (got {args.old!r}); make one with "
                "`git archive <commit> arvision | tar -x -C DIR`")

    import torch
    from bench_sampling import parse_model_specs  # imports this checkout's arvision: never in a worker
    from safetensors.torch import save_file

    import arvision

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": ""}
    rows = []
    print(f"clock: {args.clock}; old: {args.old}; this checkout: {'default malloc' if args.default_allocator else 'freed memory kept'}")
    print("| model | head | tokens | batch | old s/batch | new s/batch | old samples/s | new samples/s | speed-up "
          "(per round: median; min-max) | tokens equal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for preset, overrides in parse_model_specs(args.models):
            overrides = {**overrides, "head_type": args.head}
            torch.manual_seed(0)
            model = arvision.create_model(preset, **overrides)
            with torch.no_grad():  # off the zero-initialised logits / AdaLN, so that the tokens depend on the head
                for param in model.parameters():
                    param.add_(torch.randn_like(param) * 0.02)
            weights = Path(tmp) / "weights.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
            times: dict[str, list[float]] = {"old": [], "new": []}
            tokens = {}
            for r in range(args.rounds):
                for version in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    out = Path(tmp) / f"{version}.pt"
                    cmd = [sys.executable, __file__, "--worker", "--spec", json.dumps([preset, overrides]),
                           "--weights", str(weights), "--tokens", str(out), "--batch", str(args.batch),
                           "--repeats", str(args.repeats), "--clock", args.clock]
                    if version == "old":
                        cmd += ["--package", str(Path(args.old).resolve())]
                    if args.default_allocator:
                        cmd.append("--default-allocator")
                    result = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                                                       cwd=tmp).stdout.strip().splitlines()[-1])
                    expected = Path(args.old).resolve() if version == "old" else REPO
                    if not Path(result["file"]).resolve().is_relative_to(expected):
                        raise SystemExit(f"the {version} worker imported {result['file']}, not the package under {expected}")
                    times[version].append(statistics.median(result["seconds"]))
                    tokens[version] = torch.load(out, weights_only=True)
            equal = torch.equal(tokens["old"], tokens["new"])
            old_s, new_s = statistics.median(times["old"]), statistics.median(times["new"])
            per_round = [a / b for a, b in zip(times["old"], times["new"])]
            row = dict(preset=preset, overrides=overrides, tokens=model.num_tokens, batch=args.batch, old_s=old_s,
                       new_s=new_s, speedup=old_s / new_s, round_speedups=per_round, tokens_equal=equal,
                       clock=args.clock, old=str(args.old), default_allocator=args.default_allocator)
            rows.append(row)
            print(f"| {preset} {model.config.summary()} | {args.head} | {model.num_tokens} | {args.batch} | "
                  f"{old_s:.3f} | {new_s:.3f} | {args.batch / old_s:.3f} | {args.batch / new_s:.3f} | "
                  f"{old_s / new_s:.2f}x ({statistics.median(per_round):.2f}; {min(per_round):.2f}-{max(per_round):.2f}) "
                  f"| {'yes' if equal else 'NO'} |", flush=True)
            if not equal:
                raise SystemExit("the two versions drew different tokens: not the same computation")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
