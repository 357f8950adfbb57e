"""Does the NEPA data path keep up with the step? Loader images/s against step images/s, side by side.

The loader side is the Trainer's: ``ImageFolderDataset`` (decode) + ``pretrain_transform`` (RandomResizedCrop +
flip), through a ``DataLoader`` with the default worker count (``data.num_workers`` = 2), batches of ``--batch-size``,
timed over ``--batches`` batches after the workers have started; its output either as float32 (ToTensor + Normalize
in the workers, the previous path) or as uint8 (normalised on the device by ``NepaObjective``: 4x fewer bytes
through the workers' shared memory, pinning and the host-to-device copy). The step side is the bare arvision
pretraining step (``bench_pretrain.ArvisionStep``) at the same batch size, on a batch already on the device, plus
(uint8 rows) the device-side normalisation.

    python benchmarks/bench_loader.py --threads 1                       # CIFAR-10 from ../shared/data/cifar10
    python benchmarks/bench_loader.py --data /data/in1k --model nepa_base_patch14_224 --batch-size 64 --device cuda

``--shards [DIR]`` times instead the same loader reading WebDataset shards (``arvision data shard``; written to DIR,
a temporary folder by default, when DIR holds none) against reading the image folder, side by side in one run: the
same ``build_dataset`` + ``pretrain_transform`` (uint8) + ``ResumableSampler`` order, ``--images`` images each.

    python benchmarks/bench_loader.py --shards --images 5000 --workers 1      # CIFAR-10 train, folder vs shards
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import ArvisionStep  # noqa: E402
from measuring import median_seconds  # noqa: E402

from arvision.data import build_dataset, pretrain_transform  # noqa: E402
from arvision.data.transforms import normalize_uint8  # noqa: E402
from arvision.models import create_model  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def loader_rate(data: str, img_size: int, batch: int, batches: int, workers: int, uint8: bool,
                pin: bool) -> tuple[float, int]:
    """(images/s of the loader alone, bytes per batch)."""
    dataset = build_dataset(data, "train", pretrain_transform(img_size, uint8=uint8), img_size=img_size)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=pin, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    x, _ = next(it)  # workers started, first batches prefetched
    t0 = time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
    rate = batch * batches / (time.perf_counter() - t0)
    del it, loader
    return rate, x.numel() * x.element_size()


def shards_vs_folder(data: str, shards: Optional[str], img_size: int, batch: int, images: int,
                     workers: int, rounds: int = 2) -> list[dict]:
    """img/s of the Trainer's loader over ``images`` images of the folder's train split and of its shards."""
    import tempfile

    from arvision.data.shard_writer import write_shards
    from arvision.train.sampler import ResumableSampler, SeededDataset

    tmp = None
    if shards is None or not (Path(shards) / "train.json").is_file():
        tmp = tempfile.TemporaryDirectory(prefix="bench_shards_") if shards is None else None
        shards = tmp.name if tmp else shards
        t0 = time.perf_counter()
        index = write_shards(data, shards, "train", workers=max(1, workers))
        print(f"wrote {index['num_samples']} images in {len(index['shardlist'])} shards to {shards} "
              f"in {time.perf_counter() - t0:.1f} s")
    rows = {}
    for _ in range(rounds):  # alternated, the best round of each kept: the other jobs of a shared machine vary
        for name, source in (("image folder", data), ("shards", shards)):
            dataset = build_dataset(source, "train", pretrain_transform(img_size, uint8=True), img_size=img_size)
            sampler = ResumableSampler(len(dataset), batch, batch, seed=0)
            loader = DataLoader(SeededDataset(dataset), batch_size=batch, sampler=sampler, num_workers=workers,
                                persistent_workers=False)
            it, seen = iter(loader), 0
            next(it)  # workers started
            t0 = time.perf_counter()
            while seen < images:
                seen += len(next(it)[0])
            rate = seen / (time.perf_counter() - t0)
            row = rows.setdefault(name, dict(source=name, images=seen, rates=[], n=len(dataset)))
            row["rates"].append(rate)
            row["rate"] = max(row["rates"])
            del it, loader
    rows = list(rows.values())
    if tmp:
        tmp.cleanup()
    return rows


def step_rate(model_name: str, batch: int, steps: int, device: torch.device, precision: str,
              uint8: bool) -> float:
    """images/s of the bare step (median of 3 windows), with the device-side normalisation for uint8 input."""
    torch.manual_seed(0)
    model = create_model(model_name).to(device)
    step = ArvisionStep(model, precision)
    size = model.config.img_size
    raw = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    fixed = normalize_uint8(raw)
    run = (lambda: step(raw)) if uint8 else (lambda: step(fixed))  # NepaObjective normalises uint8 itself
    run()
    return batch * steps / median_seconds(run, device, 3, steps)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="image folder with train/ (default: %(default)s)")
    p.add_argument("--model", default="nepa_tiny_patch4_32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=20, help="loader batches timed")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per timed window")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: data.num_workers)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the main process")
    p.add_argument("--shards", nargs="?", const="", default=None, metavar="DIR",
                   help="time the loader from WebDataset shards (in DIR, written there if absent; a temporary folder "
                        "without DIR) against the image folder, instead of loader vs step")
    p.add_argument("--images", type=int, default=5000, help="images timed per source with --shards")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    img_size = create_model(args.model).config.img_size
    if args.shards is not None:
        rows = shards_vs_folder(args.data, args.shards or None, img_size, args.batch_size, args.images, args.workers)
        print(f"loader of the Trainer (pretrain_transform uint8, ResumableSampler), batch {args.batch_size}, "
              f"{args.workers} workers, {args.images} images per source, data {args.data}")
        print("| source | images in split | loader img/s (best round) | rounds |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['source']} | {r['n']} | {r['rate']:.0f} | {', '.join(f'{x:.0f}' for x in r['rates'])} |")
        print(f"shards / folder: {rows[1]['rate'] / rows[0]['rate']:.2f}x")
        return rows
    rows = []
    for uint8 in (False, True):
        lr, nbytes = loader_rate(args.data, img_size, args.batch_size, args.batches, args.workers, uint8,
                                 device.type == "cuda")
        sr = step_rate(args.model, args.batch_size, args.steps, device, args.precision, uint8)
        rows.append(dict(output="uint8" if uint8 else "float32", loader=lr, step=sr, mb=nbytes / 2 ** 20))
    print(f"{args.model}, batch {args.batch_size}, {args.workers} workers, {args.precision}, device {device} "
          f"({torch.get_num_threads()} threads), data {args.data}")
    print("| loader output | MiB / batch | loader img/s | step img/s | loader / step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['output']} | {r['mb']:.2f} | {r['loader']:.0f} | {r['step']:.0f} | {r['loader'] / r['step']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
