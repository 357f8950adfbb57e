"""Throughput (images/s) of a generative-metrics feature extractor on random uint8 images, preprocessing included.

    OMP_NUM_THREADS=1 python benchmarks/bench_fid.py --extractor fid-helper --size 32 --batch 25 --threads 1
    python benchmarks/bench_fid.py --extractor fid-helper --size 256 --batch 100 --device cuda --precision bf16

Runs ``--warmup`` untimed batches, then ``--repeats`` timed batches (device synchronised after each) and prints the
median images/s as JSON. Input images of any size are resized to 299 x 299 inside the extractor, so the cost barely
depends on --size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from arvision.metrics.extractors import build_extractor


def bench(extractor: str, size: int, batch: int, repeats: int, warmup: int, device: str,
          precision: str) -> dict:
    ext = build_extractor(extractor, device)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0)).to(device)
    amp = torch.bfloat16 if precision == "bf16" else None
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
            ext.features(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"extractor": ext.name, "provides": list(ext.provides), "size": size, "batch": batch, "device": device,
            "precision": precision, "threads": torch.get_num_threads(),
            "img_per_s": round(batch / statistics.median(times), 2),
            "img_per_s_range": [round(batch / max(times), 2), round(batch / min(times), 2)]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extractor", default="fid-helper")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(bench(a.extractor, a.size, a.batch, a.repeats, a.warmup, a.device, a.precision)))


if __name__ == "__main__":
    main()
