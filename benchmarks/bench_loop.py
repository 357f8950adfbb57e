"""The training loop against the bare step: what a user gets from ``arvision pretrain`` compared with what the step
alone could give, and the official loop (an HF-Trainer-like loop around the official step) side by side.

Three measurements in one process, on CIFAR-10 (an image folder, default ``../shared/data/cifar10``):

- ``step``: the bare arvision step (``bench_pretrain.ArvisionStep``) on a fixed batch already on the device, timed
  before and after the loops (median window);
- ``arvision loop``: the real ``Trainer`` (``arvision pretrain``'s): the ``ImageFolderDataset`` with the uint8
  ``pretrain_transform``, the default DataLoader workers, logging every ``--log-every`` steps, the weight EMA
  (``--ema``), checkpoints every ``--ckpt-every`` steps; throughput from its own per-window ``img_per_s`` after the
  first window (worker start-up and warm-up excluded), checkpoint writes included;
- ``official loop``: the official step (``official_like.OfficialStep``, with its per-step Python EMA loop over the
  state dict when ``--ema``) in the loop the HF Trainer runs: float32 batches from the same dataset and workers, a
  per-step ``isnan``/``isinf`` check of the loss read on the host (``logging_nan_inf_filter``), loss accumulation, a
  log line every ``--log-every`` steps. Its checkpoints are left out (favouring it).

    python benchmarks/bench_loop.py --threads 1
    python benchmarks/bench_loop.py --device cuda --model nepa_base_patch14_224 --data /data/in1k --batch-size 128
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import LR, WEIGHT_DECAY, ArvisionStep, build_pair  # noqa: E402
from measuring import synchronize  # noqa: E402
from official_like import OfficialStep  # noqa: E402

from arvision.config import load_config  # noqa: E402
from arvision.data import build_dataset, pretrain_transform  # noqa: E402
from arvision.data.transforms import normalize_uint8  # noqa: E402
from arvision.models import create_model  # noqa: E402
from arvision.objectives import NepaObjective  # noqa: E402
from arvision.train.distributed import DistEnv  # noqa: E402
from arvision.train.engine import Trainer  # noqa: E402
from arvision.train.logging import log  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def bare_step(args, device: torch.device, windows: int = 3) -> float:
    torch.manual_seed(0)
    model = create_model(args.model).to(device)
    step = ArvisionStep(model, args.precision)
    size = model.config.img_size
    images = normalize_uint8(torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8,
                                           device=device))
    step(images)
    times = []
    for _ in range(windows):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.window):
            step(images)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return args.batch_size * args.window / statistics.median(times)


def arvision_loop(args, device: torch.device) -> float:
    size = create_model(args.model).config.img_size
    cfg = load_config("pretrain", overrides=[
        f"model.name={args.model}", f"train.batch_size={args.batch_size}", f"train.max_steps={args.loop_steps}",
        f"train.log_every={args.log_every}", f"train.ckpt_every={args.ckpt_every}", f"train.precision={args.precision}",
        f"train.ema_decay={0.9999 if args.ema else 0.0}", f"data.num_workers={args.workers}"])
    dataset = build_dataset(args.data, "train", pretrain_transform(size, uint8=True), img_size=size)
    torch.manual_seed(0)
    model = create_model(args.model)
    with tempfile.TemporaryDirectory() as run_dir:
        env = DistEnv(device=device)
        Trainer(NepaObjective(model), dataset, cfg.train, Path(run_dir), env, num_workers=args.workers).fit()
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"][1:]  # the first window holds start-up and warm-up
    seen = [args.batch_size * args.log_every for _ in rows]
    return sum(seen) / sum(n / r["img_per_s"] for n, r in zip(seen, rows))


def official_loop(args, device: torch.device) -> float:
    """The HF Trainer's inner loop around the official step (see the module docstring)."""
    model, official = build_pair(args.model, device)
    step = OfficialStep(official, args.precision, LR, WEIGHT_DECAY, ema=args.ema)
    size = model.config.img_size
    dataset = build_dataset(args.data, "train", pretrain_transform(size), img_size=size)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(0))
    tr_loss, logged, t_start = torch.zeros((), device=device), 0.0, None
    batches = iter(loader)
    for s in range(args.loop_steps):
        if s == args.log_every:  # skip the first window, as for the arvision loop
            synchronize(device)
            t_start = time.perf_counter()
        images, _ = next(batches)
        images = images.to(device, non_blocking=True)
        loss = step(images)
        if torch.isnan(loss) or torch.isinf(loss):  # logging_nan_inf_filter: a host sync every step
            tr_loss += tr_loss / (1 + s)
        else:
            tr_loss += loss
        if (s + 1) % args.log_every == 0:
            logged = tr_loss.item() / args.log_every
            tr_loss -= tr_loss
    synchronize(device)
    del logged
    return args.batch_size * (args.loop_steps - args.log_every) / (time.perf_counter() - t_start)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="image folder with train/ (default: %(default)s)")
    p.add_argument("--model", default="nepa_tiny_patch4_32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loop-steps", type=int, default=60, help="steps of each loop (the first window is not timed)")
    p.add_argument("--window", type=int, default=5, help="steps per timed window of the bare step")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=30)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="weight EMA in both loops (the official pretraining default, decay 0.9999)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: data.num_workers)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the main process")
    p.add_argument("--no-official", action="store_true", help="skip the official loop")
    args = p.parse_args(argv)
    if args.loop_steps <= args.log_every:
        p.error("--loop-steps must exceed --log-every (the first window is not timed)")
    if args.threads:
        torch.set_num_threads(args.threads)
    log.setLevel("WARNING")
    device = torch.device(args.device)
    res = {"step (before)": bare_step(args, device)}
    res["arvision loop"] = arvision_loop(args, device)
    if not args.no_official:
        res["official loop"] = official_loop(args, device)
    res["step (after)"] = bare_step(args, device)
    step = (res["step (before)"] + res["step (after)"]) / 2
    print(f"{args.model}, batch {args.batch_size}, {args.precision}, {args.workers} workers, EMA {args.ema}, "
          f"log every {args.log_every}, checkpoint every {args.ckpt_every}, {args.loop_steps} loop steps, device "
          f"{device} ({torch.get_num_threads()} threads), data {args.data}")
    print("| side | img/s | x bare step |")
    print("|---|---|---|")
    for name, v in res.items():
        print(f"| {name} | {v:.1f} | {v / step:.2f} |")
    if "official loop" in res:
        print(f"arvision loop / official loop: {res['arvision loop'] / res['official loop']:.2f}x")
    return res


if __name__ == "__main__":
    main()
