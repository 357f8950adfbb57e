"""`arvision tokenizer train | eval | encode | reconstruct`.

    arvision tokenizer train --config cifar10_tokenizer_vq --data /data/cifar10 --out runs/vq
    arvision tokenizer eval TOKENIZER --data /data/cifar10 [--split val] [--num-images 10000] [--fid] [--save-recon R.npz]
    arvision tokenizer encode --tokenizer TOKENIZER --data /data/cifar10 --out cache/c10 [--img-size 32]
    arvision tokenizer reconstruct TOKENIZER --images a.png b.png --out recon.png [--img-size 256]

TOKENIZER is an arvision tokenizer directory (a run's checkpoint) or a published file (LlamaGen vq_ds16_c2i.pt,
MAR kl16.ckpt). --img-size defaults to the data.img_size of the run that trained the tokenizer, else 256.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .train import _add_train_args, cmd_train


def _img_size(args) -> int:
    if args.img_size:
        return args.img_size
    for parent in Path(args.tokenizer).resolve().parents:
        if (parent / "config.yaml").is_file():
            from ..files import read_yaml
            size = ((read_yaml(parent / "config.yaml") or {}).get("data") or {}).get("img_size")
            if size:
                return int(size)
            break
    return 256


def _device(args) -> str:
    import torch
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_eval(args) -> None:
    from ..checkpoints import load_tokenizer
    from ..data import fixed_subset
    from ..eval.tokenizer import evaluate_tokenizer
    from ..tasks.tokenizer import image_set

    if args.save_recon and Path(args.save_recon).is_dir():  # refused before the pass, not at its end
        raise ValueError(f"--save-recon {args.save_recon} is a folder: give a file name, "
                         f"e.g. {Path(args.save_recon) / 'recon.npz'}")
    tok = load_tokenizer(args.tokenizer, ema=args.ema)
    size = _img_size(args)
    ds = fixed_subset(image_set(args.data, args.split, size), args.num_images)
    grid = Path(args.grid) if args.grid else None
    res = evaluate_tokenizer(tok, ds, args.batch_size, args.num_workers, _device(args), args.fid, args.extractor, grid,
                             recon_path=Path(args.save_recon) if args.save_recon else None)
    from ..data.datasets import resolve_split
    used = resolve_split(args.data, args.split)  # val falls back to test (and back): report the split read
    res.update(tokenizer=str(args.tokenizer), data=str(args.data), split=used, img_size=size)
    if used != args.split:
        res["requested_split"] = args.split
    print(json.dumps(res, indent=2))
    if args.json:
        from ..files import write_json
        write_json(args.json, res)


def cmd_encode(args) -> None:
    from ..data.token_cache_writer import build_token_cache
    from ..checkpoints import load_tokenizer
    from ..train.distributed import join_process_group

    if args.crop_range is not None and not args.ten_crop:
        raise ValueError("--crop-range sizes the centre crop that --ten-crop cuts its crops from: give it with "
                         "--ten-crop")
    if args.ten_crop and args.no_flip:
        raise ValueError("--ten-crop already holds each crop's mirror: drop --no-flip")
    tok = load_tokenizer(args.tokenizer, ema=args.ema)
    if args.scale_factor is not None:
        if tok.token_type != "continuous":
            raise ValueError("--scale-factor applies to continuous (KL) tokenizers only")
        tok.config.scale_factor = args.scale_factor
    rank, _ = join_process_group()  # torchrun: the batches are shared out over the processes
    device = _device(args)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    stats = build_token_cache(tok, args.data, args.out, split=args.split, img_size=_img_size(args),
                              batch_size=args.batch_size, num_workers=args.num_workers, flip=not args.no_flip,
                              device=device, amp=args.bf16, limit=args.limit,
                              tokenizer_source=str(args.tokenizer), overwrite=args.overwrite, ten_crop=args.ten_crop,
                              crop_range=1.1 if args.crop_range is None else args.crop_range, progress=rank == 0)
    if rank == 0:
        print(json.dumps({"cache": str(args.out), **stats}, indent=2))


def cmd_reconstruct(args) -> None:
    import torch
    from PIL import Image
    from torchvision.utils import save_image

    from ..checkpoints import load_tokenizer
    from ..data.transforms import generation_transform
    from ..files import atomic_write

    tok = load_tokenizer(args.tokenizer, ema=args.ema)
    tf = generation_transform(_img_size(args))
    imgs = []
    for p in args.images:
        with Image.open(p) as im:
            imgs.append(tf(im).float() / 127.5 - 1)
    x = torch.stack(imgs)
    with torch.no_grad():
        y = tok.decode(tok.encode(x))
    out = Path(args.out)
    with atomic_write(out, suffix=out.suffix or ".png") as tmp:
        save_image(torch.stack([x, y.clamp(-1, 1)], 1).flatten(0, 1) * 0.5 + 0.5, tmp, nrow=2)
    print(f"wrote {out} (rows: original, reconstruction)")


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="image tokenizers: train, eval, encode a token cache, reconstruct")
    tsub = p.add_subparsers(dest="action", required=True)

    q = tsub.add_parser("train", help="train a VQ or KL tokenizer (synthetic data by default)")
    _add_train_args(q)
    q.set_defaults(func=lambda a: cmd_train("tokenizer", a))

    def common(q, positional=True):
        if positional:
            q.add_argument("tokenizer", help="arvision tokenizer directory or published LlamaGen/MAR file")
        q.add_argument("--img-size", type=int, help="centre-crop size (default: the training run's, else 256)")
        q.add_argument("--ema", action="store_true", help="use the EMA weights of an arvision checkpoint")
        q.add_argument("--device", help="cpu | cuda (default: cuda when available)")

    q = tsub.add_parser("eval", help="reconstruction PSNR, codebook usage / perplexity, optional rFID")
    common(q)
    q.add_argument("--data", required=True, help="image folder, HF save_to_disk folder, WebDataset shards or 'synthetic'")
    q.add_argument("--split", default="val", help="split to evaluate (val falls back to test)")
    q.add_argument("--num-images", type=int, help="evaluate a fixed random subset of this size")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--num-workers", type=int, default=2)
    q.add_argument("--fid", action="store_true", help="also rFID (reconstructions vs originals)")
    q.add_argument("--extractor", default="fid-helper", help="fid-helper | inception[:weights] | classifier path")
    q.add_argument("--grid", help="write a PNG of originals and reconstructions here")
    q.add_argument("--save-recon", metavar="NPZ", help="write the reconstructions and their labels as an ADM .npz, "
                   "for `arvision eval fid NPZ REF` (rFID against the training set's statistics, sFID, P/R)")
    q.add_argument("--json", help="also write the results here")
    q.set_defaults(func=cmd_eval)

    q = tsub.add_parser("encode", help="encode a dataset once into a token cache (with flip copies)")
    q.add_argument("--tokenizer", required=True, help="arvision tokenizer directory or published LlamaGen/MAR file")
    common(q, positional=False)
    q.add_argument("--data", required=True, help="image folder, HF save_to_disk folder, WebDataset shards or 'synthetic'")
    q.add_argument("--out", required=True, help="cache directory (an interrupted encode resumes here)")
    q.add_argument("--split", default="train")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--num-workers", type=int, default=2)
    q.add_argument("--no-flip", action="store_true", help="no horizontal-flip copies")
    q.add_argument("--ten-crop", action="store_true", help="10 copies per image, LlamaGen's --ten-crop: the centre "
                   "and four corner crops of a centre crop --crop-range times larger, each with its mirror")
    q.add_argument("--crop-range", type=float, default=None, help="with --ten-crop: the larger centre crop's size "
                   "over --img-size (default 1.1, LlamaGen's)")
    q.add_argument("--bf16", action="store_true", help="bf16 autocast for the encoder")
    q.add_argument("--limit", type=int, help="encode a fixed random subset of N images (seed 0)")
    q.add_argument("--scale-factor", type=float, help="KL: latent scale stored in the cache (default: tokenizer's)")
    q.add_argument("--overwrite", action="store_true",
                   help="encode again into a cache made with another tokenizer or other settings (else an error)")
    q.set_defaults(func=cmd_encode)

    q = tsub.add_parser("reconstruct", help="encode and decode images, write originals next to reconstructions")
    common(q)
    q.add_argument("--images", nargs="+", required=True)
    q.add_argument("--out", required=True, help="output PNG")
    q.set_defaults(func=cmd_reconstruct)
