"""Tokenizer throughput: encode and decode images/s per preset, and the token-cache build time.

Each preset is timed at its image size with random weights (throughput does not depend on the values): after
``--warmup`` calls, ``--repeats`` windows of ``--iters`` calls each, one device synchronisation per window; the median
window gives images/s. The cache build encodes ``--cache-images`` synthetic images (plus their flips) end to end
(rendering, centre crop, encode, memory-mapped writes, header) with ``arvision.data.token_cache_writer.build_token_cache``.

    python benchmarks/bench_tokenizer.py                                  # CPU: the 32 px presets
    python benchmarks/bench_tokenizer.py --device cuda --presets llamagen_vq16:256,mar_kl16:256 --batch-size 64 \\
        --precision bf16 --out tok_h100.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measuring import median_seconds  # noqa: E402
from arvision.data.token_cache_writer import build_token_cache  # noqa: E402
from arvision.models import count_parameters, create_model  # noqa: E402


@torch.no_grad()
def time_calls(fn, device, warmup: int, iters: int, repeats: int) -> float:
    """Median seconds per call, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return median_seconds(fn, device, repeats, iters) / iters


def bench_preset(name: str, size: int, args, device) -> dict:
    tok = create_model(name).to(device).eval()
    x = torch.rand(args.batch_size, 3, size, size, device=device) * 2 - 1
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with torch.no_grad(), torch.autocast(**amp):
        tokens = tok.encode(x)
    if tok.token_type == "continuous":
        tokens = tokens.float()

    def enc():
        with torch.autocast(**amp):
            tok.encode(x)

    def dec():
        with torch.autocast(**amp):
            tok.decode(tokens)

    t_enc = time_calls(enc, device, args.warmup, args.iters, args.repeats)
    t_dec = time_calls(dec, device, args.warmup, args.iters, args.repeats)
    return dict(preset=name, img_size=size, params_M=round(count_parameters(tok) / 1e6, 2),
                batch_size=args.batch_size, precision=args.precision,
                encode_img_s=round(args.batch_size / t_enc, 1), decode_img_s=round(args.batch_size / t_dec, 1))


def bench_cache(name: str, size: int, args, device) -> dict:
    tok = create_model(name)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        stats = build_token_cache(tok, "synthetic", Path(d) / "cache", split="val", img_size=size,
                                  batch_size=args.batch_size, num_workers=args.num_workers, device=str(device),
                                  amp=args.precision == "bf16", limit=args.cache_images, progress=False)
        total = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in (Path(d) / "cache").glob("*.npy")) / 2**20
    return dict(preset=name, img_size=size, images=stats["num_images"], copies=2, seconds=round(total, 2),
                images_per_second=round(stats["num_images"] / total, 1), cache_MiB=round(size_mb, 2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="vq_f4_32px:32,kl_f4_32px:32", help="name:img_size,...")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-images", type=int, default=512, help="0 skips the cache build")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = dict(machine=dict(platform=platform.platform(), torch=torch.__version__, threads=torch.get_num_threads(),
                                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
                   throughput=[], cache=[])
    for item in args.presets.split(","):
        name, size = item.split(":")
        row = bench_preset(name, int(size), args, device)
        results["throughput"].append(row)
        print(json.dumps(row))
        if args.cache_images:
            row = bench_cache(name, int(size), args, device)
            results["cache"].append(row)
            print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
