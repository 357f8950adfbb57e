"""`arvision eval knn | linear | attentive | classify | nll | fid | nearest`: probes of frozen features, classifier
accuracy, a generator's held-out next-token likelihood, generative metrics, the nearest-training-image check."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _eval_data(args, img_size: int):
    import torch
    from ..data import build_dataset, eval_transform, fixed_subset, resolve_split

    tf = eval_transform(img_size, crop_pct=args.crop_pct) if args.crop_pct else eval_transform(img_size)
    test_split = resolve_split(args.data, args.split)
    train = build_dataset(args.data, "train", tf, img_size=img_size)
    test = build_dataset(args.data, test_split, tf, img_size=img_size)
    train = fixed_subset(train, args.train_samples or None)  # the same subset for every model
    mk = lambda ds: torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers)
    return mk(train), mk(test), test_split, train, test


def cmd_eval_probe(args) -> None:
    import torch
    from ..eval import FeatureSpec, attentive_eval, knn_eval, linear_eval
    from ..checkpoints import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.checkpoint, family="nepa_vit").to(device)
    spec = FeatureSpec.parse(blocks=args.blocks, pool=args.pool, depth=len(model.blocks))
    train_loader, test_loader, split, train, test = _eval_data(args, model.config.img_size)
    amp = torch.bfloat16 if args.precision == "bf16" else None
    if args.kind == "knn":
        res = knn_eval(model, train_loader, test_loader, spec, k=args.k, temperature=args.temperature,
                       device=device, amp_dtype=amp)
    elif args.kind == "linear":
        res = linear_eval(model, train_loader, test_loader, spec, epochs=args.epochs, device=device, amp_dtype=amp)
    else:
        res = attentive_eval(model, train_loader, test_loader, spec, epochs=args.epochs, num_heads=args.heads,
                             device=device, amp_dtype=amp)
    res = {k: v for k, v in res.items() if isinstance(v, (int, float, str, list, dict))}
    res.update(checkpoint=str(args.checkpoint), data=str(args.data), split=split, blocks=args.blocks, pool=args.pool)
    print(json.dumps(res, indent=2, default=str))
    out = Path(args.out or Path(args.checkpoint) / f"eval_{args.kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"{args.kind}: top-1 {res['top1']:.2f}% on {split} ({len(test)} images) -> {out}")


def cmd_eval_classify(args) -> None:
    import torch
    from ..data import build_dataset, eval_transform, resolve_split
    from ..eval.classify import evaluate_classifier
    from ..checkpoints import load_model

    if args.resize is not None and args.crop_pct is not None:
        raise ValueError("give --resize or --crop-pct, not both")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.checkpoint, family="nepa_vit", ema=args.ema).to(device)
    num_classes = model.config.num_classes
    if not num_classes:
        raise ValueError(f"{args.checkpoint} has no classifier head; fine-tune it first (arvision finetune "
                         f"model.init={args.checkpoint}) or use `arvision eval knn|linear`")
    img_size = model.config.img_size
    split = resolve_split(args.data, args.split)
    dataset = build_dataset(args.data, split, eval_transform(img_size, args.resize, args.crop_pct), img_size=img_size)
    classes = getattr(dataset, "classes", None)
    if classes and len(classes) != num_classes:
        raise ValueError(f"{args.data} [{split}] has {len(classes)} classes but the classifier has {num_classes}; "
                         "evaluate on data with the classes it was trained on (same class folders)")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    causal = None if args.attention == "default" else args.attention == "causal"
    res = evaluate_classifier(model, loader, device, torch.bfloat16 if args.precision == "bf16" else None, causal,
                              progress=True)
    res.update(checkpoint=str(args.checkpoint), ema=args.ema, data=str(args.data), split=split,
               resize=args.resize, crop_pct=args.crop_pct,
               causal=model.config.causal if causal is None else causal, precision=args.precision)
    print(json.dumps(res, indent=2))
    local = Path(args.checkpoint)
    out = Path(args.out) if args.out else (local if local.is_dir() else Path(".")) / "eval_classify.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"classify: top-1 {res['top1']:.2f}%, top-5 {res['top5']:.2f}% on {split} ({res['n']} images) -> {out}")


def cmd_eval_fid(args) -> None:
    import torch
    from ..eval.generative import evaluate_generative
    from ..files import write_json
    from ..generate.shards import samples_npz

    if args.save_ref_features and not args.save_ref_stats:
        raise ValueError("--save-ref-features stores the features in the statistics file; give --save-ref-stats PATH too")
    samples = samples_npz(args.samples)  # a sampling directory: its .npz, or one line saying what is missing
    env = None
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: shard the extraction
        from ..train.distributed import init_distributed
        env = init_distributed(args.device or "auto")
    res = evaluate_generative(
        samples, args.ref, extractor=args.extractor, num_samples=args.num_samples, num_ref=args.num_ref,
        batch_size=args.batch_size, num_workers=args.num_workers, image_size=args.image_size, split=args.split,
        ref_split=args.ref_split, precision_recall_k=None if args.no_pr else args.k,
        amp_dtype=torch.bfloat16 if args.precision == "bf16" else None, device=env.device if env else args.device,
        save_ref_stats=args.save_ref_stats, progress=not args.no_progress,
        kid_subsets=None if args.no_kid else args.kid_subsets, kid_subset_size_max=args.kid_subset_size,
        save_ref_features=args.save_ref_features)
    if env is None or env.is_main:
        print(json.dumps(res, indent=2))
        for metric, reason in res.get("skipped", {}).items():
            print(f"{metric} not computed: {reason}", file=sys.stderr)
        if args.out:
            print(f"results -> {write_json(args.out, res)}")
        if args.save_ref_stats:
            print(f"reference statistics -> {args.save_ref_stats}")
    if env is not None:
        from ..train.distributed import cleanup
        cleanup()


def cmd_eval_nll(args) -> None:
    import torch

    from ..checkpoints import load_model
    from ..data.token_cache import TokenCache
    from ..eval.token_nll import check_cache_fits, held_out_nll
    from ..files import write_json
    from .generate import run_token_cache

    if args.num is not None and args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")
    model = load_model(args.checkpoint, family="heptapod", ema=args.ema)
    cache = TokenCache(args.data)
    check_cache_fits(model, cache, trained_on=run_token_cache(args.checkpoint, required=False))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    res = held_out_nll(model.to(device), cache, num=args.num, batch_size=args.batch_size)
    res.update(checkpoint=str(args.checkpoint), data=str(args.data), weights="ema" if args.ema else "model")
    print(f"next-token NLL {res['nll']:.4f} nats/token ({res['bits_per_token']:.4f} bits, perplexity "
          f"{res['perplexity']:.1f}) on {res['num_grids']} grids; by row: "
          + " ".join(f"{v:.3f}" for v in res["by_row"]))
    out = Path(args.out) if args.out else (Path(args.checkpoint) / "eval_nll.json" if Path(args.checkpoint).is_dir()
                                           else None)
    if out is not None:
        print(f"results -> {write_json(out, res)}")


def cmd_eval_nearest(args) -> None:
    import numpy as np
    from torch.utils.data import ConcatDataset
    from ..eval.generative import open_images, subset
    from ..files import write_json
    from ..eval.nearest import distance_summary, nearest_training_images

    samples = subset(open_images(args.samples, image_size=args.image_size), args.num_samples)
    training = open_images(args.data, args.split, args.image_size)
    baseline = open_images(args.baseline, image_size=args.image_size) if args.baseline else None
    # one read of the training set for the samples and the baseline together
    both = ConcatDataset([samples, baseline]) if baseline is not None else samples
    dist, index = nearest_training_images(both, training, args.num_workers, progress=True)
    base = dist[len(samples):] if baseline is not None else None
    dist, index = dist[:len(samples)], index[:len(samples)]
    res = {**distance_summary(dist, base), "samples": str(args.samples), "data": str(args.data),
           "num_training": len(training), "baseline_images": str(args.baseline) if args.baseline else None}
    if args.grid:
        import torch
        from ..generate.outputs import save_image, tile_images

        nearest = torch.argsort(dist)[:args.grid_n].tolist()
        pairs = [torch.stack([samples[i], training[int(index[i])]]).permute(0, 2, 3, 1).numpy() for i in nearest]
        rows = [np.concatenate(pairs[r:r + 8]) for r in range(0, len(pairs), 8)]
        save_image(tile_images(rows, per_row=16), args.grid)
        res["grid"] = str(args.grid)
    print(json.dumps(res, indent=2))
    if args.out:
        write_json(args.out, res)
    line = f"nearest training image: median {res['q50']:.3f}, 1st percentile {res['q01']:.3f} ({res['num']} samples)"
    if base is not None:
        line += (f"; baseline median {res['baseline']['q50']:.3f}, 1st percentile {res['baseline']['q01']:.3f}; "
                 f"{100 * res['below_baseline_q01']:.1f}% of samples below it (about 1% if none is a copy)")
    print(line)


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: knn | linear | attentive | classify | nll; "
                       "samples: fid | nearest")
    esub = p.add_subparsers(dest="kind", required=True)
    for kind, text in (("knn", "weighted kNN (k=20, T=0.07, cosine) on frozen features"),
                       ("linear", "linear probe on frozen features"),
                       ("attentive", "attentive probe (AIM): a learned query cross-attends to a block's frozen tokens")):
        q = esub.add_parser(kind, help=text)
        q.add_argument("checkpoint", help="arvision or official checkpoint directory, or a Hub id")
        q.add_argument("--data", required=True, help="labelled data: image folder with train/ and val/ or test/, or WebDataset shards")
        q.add_argument("--split", default="val", help="evaluation split (val falls back to test)")
        q.add_argument("--blocks", default="last", help="blocks to read: an index, a comma list (averaged), a slice (-4:), middle, last, all")
        q.add_argument("--pool", default="mean", choices=["mean", "cls", "last"], help="token pooling")
        q.add_argument("--batch-size", type=int, default=256)
        q.add_argument("--num-workers", type=int, default=2)
        q.add_argument("--crop-pct", type=float, default=None, help="eval resize = img_size / crop_pct")
        q.add_argument("--train-samples", type=int, default=None, help="use a fixed random subset of the train split")
        q.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
        q.add_argument("--out", help="result JSON (default CHECKPOINT/eval_<kind>.json)")
        if kind == "knn":
            q.add_argument("--k", type=int, default=20)
            q.add_argument("--temperature", type=float, default=0.07)
        elif kind == "linear":
            q.add_argument("--epochs", type=int, default=50)
        else:
            q.add_argument("--epochs", type=int, default=20)
            q.add_argument("--heads", type=int, default=4, help="attention heads of the probe's query")
        q.set_defaults(func=cmd_eval_probe)

    q = esub.add_parser("classify", help="top-1 / top-5 of a classifier checkpoint (fine-tuned or official -sft)")
    q.add_argument("checkpoint", help="arvision or official classifier checkpoint directory, or a Hub id")
    q.add_argument("--data", required=True, help="image folder with val/ or test/ class folders, HF save_to_disk, or WebDataset shards")
    q.add_argument("--split", default="val", help="evaluation split (val falls back to test)")
    q.add_argument("--resize", type=int, default=None, help="shorter side before the centre crop (default "
                   "img_size / 0.875, i.e. 256 for 224; none for img_size <= 64)")
    q.add_argument("--crop-pct", type=float, default=None, help="square warp to img_size / crop_pct, then centre "
                   "crop (the official L eval: 0.95)")
    q.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    q.add_argument("--attention", default="default", choices=["default", "causal", "bidirectional"],
                   help="default: the checkpoint's attention mode")
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--num-workers", type=int, default=2)
    q.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    q.add_argument("--out", help="result JSON (default CHECKPOINT/eval_classify.json for a local checkpoint)")
    q.set_defaults(func=cmd_eval_classify)

    q = esub.add_parser("nll", help="held-out next-token NLL of a Heptapod generator on a token cache "
                        "(docs/generation.md)")
    q.add_argument("checkpoint", help="a Heptapod checkpoint directory")
    q.add_argument("--data", required=True, help="a token cache of held-out images, encoded with the generator's "
                   "tokenizer (`arvision tokenizer encode --split test --no-flip`)")
    q.add_argument("--num", type=int, default=None, help="a fixed random subset of N grids (seed 0; default all)")
    q.add_argument("--ema", action="store_true", help="score the checkpoint's EMA weights")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--device", default=None, help="default: cuda when available")
    q.add_argument("--out", help="result JSON (default CHECKPOINT/eval_nll.json)")
    q.set_defaults(func=cmd_eval_nll)

    q = esub.add_parser("nearest", help="each sample's pixel distance to its nearest training image, beside a "
                        "baseline of unseen images: are samples copies? (docs/generation.md)")
    q.add_argument("samples", help="image folder, .npz (ADM's arr_0) or .npy of samples")
    q.add_argument("data", help="the training images: dataset folder (--split), image folder or .npz")
    q.add_argument("--split", default="train", help="split of DATA when it is a dataset folder")
    q.add_argument("--baseline", help="images the model never trained on (e.g. `arvision tokenizer eval --split test "
                   "--save-recon R.npz`): their distances are the reference distribution")
    q.add_argument("--num-samples", type=int, default=None, help="fixed random subset of the samples (seed 0)")
    q.add_argument("--image-size", type=int, default=None, help="centre-crop every image to N px (ADM's crop)")
    q.add_argument("--grid", help="PNG of the nearest samples, each beside its nearest training image")
    q.add_argument("--grid-n", type=int, default=32, help="samples in the grid (the nearest ones)")
    q.add_argument("--num-workers", type=int, default=0)
    q.add_argument("--out", help="result JSON")
    q.set_defaults(func=cmd_eval_nearest)

    q = esub.add_parser("fid", help="FID / sFID / IS / KID / precision-recall of samples against a reference (docs/metrics.md)")
    q.add_argument("samples", help="image folder (recursive; hidden names skipped), .npz (ADM's arr_0 or uint8 "
                   "images under any key) or .npy, "
                   "dataset folder, or an `arvision sample` output directory (refused while shards are missing)")
    q.add_argument("ref", help="dataset or image folder, ADM reference batch .npz, or statistics .npz (mu, sigma)")
    q.add_argument("--extractor", default="fid-helper", help="fid-helper[:default_1.pt] (offline TF FID Inception), "
                   "inception[:WEIGHTS] (torch-fidelity), or an arvision classifier checkpoint (reported as FD-<name>)")
    q.add_argument("--num-samples", type=int, default=None, help="fixed random subset of the samples (seed 0)")
    q.add_argument("--num-ref", type=int, default=None, help="fixed random subset of the reference images (seed 0)")
    q.add_argument("--split", default="val", help="split of SAMPLES when it is a dataset folder (val falls back to test)")
    q.add_argument("--ref-split", default="train", help="split of REF when it is a dataset folder")
    q.add_argument("--image-size", type=int, default=None, help="resize + centre-crop every image (ADM's center_crop_arr)")
    q.add_argument("--k", type=int, default=3, help="k of the k-NN radii for precision / recall")
    q.add_argument("--no-pr", action="store_true", help="skip precision / recall (no reference features needed)")
    q.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subsets (torch-fidelity: 100)")
    q.add_argument("--kid-subset-size", type=int, default=1000, help="KID: rows per subset (torch-fidelity: 1000; "
                   "fewer samples or reference images: all of the smaller set)")
    q.add_argument("--no-kid", action="store_true", help="skip KID")
    q.add_argument("--batch-size", type=int, default=50)
    q.add_argument("--num-workers", type=int, default=2)
    q.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 shifts Inception features; "
                   "use fp32 for numbers compared with published FID")
    q.add_argument("--device", default=None, help="default: cuda when available")
    q.add_argument("--save-ref-stats", default=None, help="write the reference statistics (.npz) for reuse")
    q.add_argument("--save-ref-features", action="store_true",
                   help="with --save-ref-stats: also store the reference's pool features, so that KID and "
                        "precision / recall can use the file (50k Inception features: 410 MB)")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--out", help="result JSON")
    q.set_defaults(func=cmd_eval_fid)
