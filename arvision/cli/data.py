"""`arvision data shard`: an image folder's split as WebDataset tar shards (readable by every --data).

    arvision data shard /data/in1k /data/in1k-wds --split train --max-size 1000
    arvision pretrain --data '/data/in1k-wds/train-{000000..000146}.tar'     # or --data /data/in1k-wds
"""
from __future__ import annotations

import os


def cmd_shard(args) -> None:
    from ..data.shard_writer import write_shards

    from functools import partial

    from ..data.datasets import available_splits
    from ..train.logging import progress_bar

    splits = ([{"validation": "val"}.get(s, s) for s in available_splits(args.folder)] if args.split == "all"
              else [args.split])
    for split in splits:
        index = write_shards(args.folder, args.out, split, shard_size=args.shard_size, max_size_mb=args.max_size,
                             seed=None if args.no_shuffle else args.seed, workers=args.workers,
                             progress=partial(progress_bar, unit="img"))
        total = sum(s["filesize"] for s in index["shardlist"])
        print(f"wrote {index['num_samples']} images of {len(index['classes'])} classes in "
              f"{len(index['shardlist'])} shards ({total / 2 ** 20:.1f} MiB) to {args.out}/{index['name']}-*.tar, "
              f"index {args.out}/{index['name']}.json" + (f"; skipped {index['skipped']} unreadable"
                                                           if index["skipped"] else ""))


def register(sub) -> None:
    p = sub.add_parser("data", help="dataset tools: write WebDataset shards from an image folder")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("shard", help="write an image folder's split as WebDataset tar shards with a JSON index")
    q.add_argument("folder", help="image folder with train/ (and val/ or test/) class folders")
    q.add_argument("out", help="output folder: OUT/<split>-000000.tar ... and OUT/<split>.json")
    q.add_argument("--split", default="train", help="train, val, test, or all (every split found; default train)")
    size = q.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=int, help="images per shard")
    size.add_argument("--max-size", type=float, help="largest shard in MB (default 1000)")
    q.add_argument("--seed", type=int, default=0, help="the fixed random order of the images in the shards")
    q.add_argument("--no-shuffle", action="store_true", help="keep the folder's (class-sorted) order")
    q.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that read and check the images (default %(default)s)")
    q.set_defaults(func=cmd_shard)
