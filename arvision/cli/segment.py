"""`arvision segment train | eval | predict`.

    arvision segment train [--config nepa_b14_ade20k_upernet] [--data DIR] [--out DIR] [--resume] [key=value ...]
    arvision segment eval CHECKPOINT --data DIR [--split val] [--mode slide|whole] [--crop 512] [--stride 341]
                          [--flip] [--ratios 0.5,0.75,1.0,1.25,1.5,1.75] [--test-scale 2048,512] [--json PATH]
    arvision segment predict CHECKPOINT --images a.jpg b.jpg --out DIR [--classes classes.json] [--flip]

CHECKPOINT is a segmentor checkpoint (a run's RUN/best or RUN/checkpoints/step_N). --crop / --stride / --test-scale
default to the evaluation settings of the run that trained it (RUN/config.yaml), else the backbone's img_size.
"""
from __future__ import annotations

import json
from pathlib import Path

from .train import _add_train_args, cmd_train


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _run_eval_settings(checkpoint: str) -> dict:
    """crop, stride, test_scale (and img_size for synthetic data) of the training run holding ``checkpoint``."""
    for parent in Path(checkpoint).resolve().parents:
        if (parent / "config.yaml").is_file():
            from ..files import read_yaml
            cfg = read_yaml(parent / "config.yaml") or {}
            d, e = cfg.get("data") or {}, cfg.get("eval") or {}
            return {"crop": e.get("crop_size") or d.get("crop_size"), "stride": e.get("stride"),
                    "test_scale": e.get("test_scale"), "img_size": d.get("img_size")}
    return {}


def _settings(args) -> dict:
    run = _run_eval_settings(args.checkpoint)
    test_scale = args.test_scale if args.test_scale is not None else (",".join(map(str, run["test_scale"]))
                                                                        if run.get("test_scale") else "none")
    return dict(mode=args.mode, crop=args.crop or run.get("crop"), stride=args.stride or run.get("stride"),
                flip=args.flip, ratios=_floats(args.ratios),
                test_scale=None if test_scale.lower() == "none" else _ints(test_scale), ema=args.ema)


def cmd_eval(args) -> None:
    from ..tasks.segment import evaluate_checkpoint

    run = _run_eval_settings(args.checkpoint)
    res = evaluate_checkpoint(args.checkpoint, args.data, args.split, device=args.device, bf16=args.bf16,
                              max_samples=args.max_samples, img_size=args.img_size or run.get("img_size") or 32,
                              reduce_zero_label=args.reduce_zero_label or None, batch_size=args.batch_size,
                              num_workers=args.num_workers, **_settings(args))
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    print(json.dumps({k: res[k] for k in ("mIoU", "mAcc", "aAcc", "n")}, indent=2))
    if args.json:
        from ..files import write_json
        write_json(args.json, res)
        print(f"per-class IoU / Acc written to {args.json}")


def cmd_predict(args) -> None:
    from ..tasks.segment import predict

    s = _settings(args)
    paths = predict(args.checkpoint, args.images, args.out, args.classes, s["mode"], s["crop"], s["stride"],
                    s["flip"], s["ratios"], s["test_scale"], s["ema"], args.device or "cpu", args.alpha)
    for p in paths:
        print(p)


def register(sub) -> None:
    p = sub.add_parser("segment", help="semantic segmentation: train, eval (mIoU), predict (colour overlays)")
    ssub = p.add_subparsers(dest="action", required=True)

    q = ssub.add_parser("train", help="train a segmentor (synthetic data by default)")
    _add_train_args(q)
    q.set_defaults(func=lambda a: cmd_train("segment", a))

    def common(q):
        q.add_argument("checkpoint", help="segmentor checkpoint directory (RUN/best, RUN/checkpoints/step_N)")
        q.add_argument("--mode", default="slide", choices=("slide", "whole"), help="sliding-window or whole image")
        q.add_argument("--crop", type=int, help="window size (default: the training run's crop)")
        q.add_argument("--stride", type=int, help="window stride (default: 2/3 of the window)")
        q.add_argument("--flip", action="store_true", help="horizontal-flip test-time augmentation")
        q.add_argument("--ratios", default="1.0", help="multi-scale TTA ratios, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
        q.add_argument("--test-scale", help="resize to fit (long,short) before inference, e.g. 2048,512; 'none': as "
                       "is (default: the training run's eval.test_scale)")
        q.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
        q.add_argument("--device", help="cpu | cuda (default: cuda when available for eval, cpu for predict)")

    q = ssub.add_parser("eval", help="mIoU / mAcc / aAcc and per-class IoU on a dataset split")
    common(q)
    q.add_argument("--data", required=True, help="ADEChallengeData2016 folder, images+annotations folder with a "
                   "class list, or 'synthetic'")
    q.add_argument("--split", default="val")
    q.add_argument("--max-samples", type=int, help="evaluate a fixed random subset of this size")
    q.add_argument("--img-size", type=int, help="synthetic data: image size (default: the training run's)")
    q.add_argument("--reduce-zero-label", action="store_true", help="generic folders: annotation 0 is ignored")
    q.add_argument("--batch-size", type=int, default=1, help="images per forward (> 1 needs equal image sizes)")
    q.add_argument("--num-workers", type=int, default=2)
    q.add_argument("--bf16", action="store_true", help="bf16 autocast")
    q.add_argument("--json", help="write every number (per-class IoU / Acc included) here")
    q.set_defaults(func=cmd_eval)

    q = ssub.add_parser("predict", help="colour overlays (PNG, with a legend) and label maps for images")
    common(q)
    q.add_argument("--images", nargs="+", required=True)
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--classes", help="class list (classes.json / .csv / .txt) for names and colours (default: the "
                   "checkpoint's)")
    q.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours in the overlay")
    q.set_defaults(func=cmd_predict)
