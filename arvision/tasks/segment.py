"""Semantic segmentation recipe: a segmentor (NEPA backbone + UperNet or linear head) trained by the shared Trainer with
the MAE/BEiT ADE20K setting (AdamW, layer decay 0.65, poly schedule with linear warmup, pixel CE + 0.4 auxiliary CE),
evaluated with sliding-window inference on a dataset-level confusion matrix; plus checkpoint evaluation and colour
overlays.

    arvision segment train                                                     # synthetic set, tiny model, CPU minutes
    arvision segment train --config nepa_b14_ade20k_upernet --data /data/ADEChallengeData2016 \
        model.backbone_init=path/to/nepa-base-patch14-224
    arvision segment eval RUN/best --data /data/ADEChallengeData2016 --flip
    arvision segment predict RUN/best --images a.jpg b.jpg --out overlays/

    seg = build_segmentor(cfg, num_classes=150)                  # from model.backbone_init or the preset
    res = evaluate_checkpoint("RUN/best", "synthetic")          # {"mIoU", "mAcc", "aAcc", "IoU": {...}, ...}
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoints import load_segmentor
from ..data import build_segmentation_dataset, fixed_subset, seg_eval_transform, seg_train_transform
from ..eval.segmentation import evaluate_segmentation, inference, overlay_image, save_png
from ..files import write_json
from ..models import create_model, model_config
from ..models.registry import check_preset
from ..models.segmentation import IGNORE_INDEX, Segmentor
from ..objectives.segmentation import SegmentationConfig, SegmentationObjective
from ..train.distributed import barrier
from ..train.engine import Trainer
from ..train.logging import log
from .common import fit_and_time, prepare_run, resolve_best_metric, resume_run, seed_everything

BEST_METRICS = ("mIoU", "ema_mIoU", "mAcc", "ema_mAcc", "aAcc", "ema_aAcc")
SCALARS = ("mIoU", "mAcc", "aAcc")


# ------------------------------------------------------------------------------------------------- model

def build_segmentor(cfg, num_classes: int, classes: Optional[Sequence[str]] = None,
                    palette: Optional[Sequence[Sequence[int]]] = None) -> Segmentor:
    """The segmentor of the ``model`` / ``segment`` config sections: the preset ``model.name`` (head, pyramid and,
    without ``backbone_init``, the backbone architecture) with ``model.head`` / ``model.args``; the backbone from
    ``model.backbone_init`` (arvision or official NEPA checkpoint) or random init."""
    m, s = cfg.model, cfg.segment
    fields = {**model_config(check_preset(m.name, ("segmentor",))).to_dict(), **dict(m.args or {})}
    fields.update(num_classes=num_classes, causal=s.causal, aux_head=s.aux_weight > 0, ignore_index=s.ignore_index,
                  classes=list(classes) if classes else None, palette=[list(c) for c in palette] if palette else None)
    if m.head:
        fields["head"] = m.head
    bb_args = {**dict(m.backbone_args or {}), "drop_path_rate": s.drop_path_rate}
    preset_depth = fields["backbone"]["depth"]
    if m.backbone_init:
        from ..checkpoints import load_model

        backbone = load_model(m.backbone_init, family="nepa_vit", ema=m.init_ema, num_classes=0, **bb_args)
        if backbone.mask_token is not None:
            backbone.drop_mask_token()
        _fit_out_indices(fields, m.args, preset_depth, backbone.config.depth)
        fields.pop("backbone")
        model = Segmentor.from_backbone(backbone, **fields)
        log.info(f"backbone initialised from {m.backbone_init}")
    else:
        fields["backbone"] = {**fields["backbone"], **bb_args}
        _fit_out_indices(fields, m.args, preset_depth, fields["backbone"]["depth"])
        model = create_model(m.name, **fields)
    model.train()
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    n = sum(p.numel() for p in model.parameters())
    log.info(f"segmentor {m.name} ({model.config.summary()}): {n / 1e6:.2f}M parameters")
    return model


def _fit_out_indices(fields: dict, args, preset_depth: int, depth: int) -> None:
    """The preset's pyramid blocks belong to its backbone depth: another depth takes the defaults
    (``default_out_indices``) unless ``model.args`` names the blocks."""
    if "out_indices" not in (args or {}) and depth != preset_depth:
        fields["out_indices"] = None


# ------------------------------------------------------------------------------------------------- data

def train_transform(d, ignore_index: int = IGNORE_INDEX):
    return seg_train_transform(d.crop_size, tuple(d.scale), tuple(d.ratio_range), d.cat_max_ratio, d.hflip,
                               d.photometric, ignore_index=ignore_index)


def dataset(d, split: str, transform, num_samples: Optional[int] = None, ignore_index: int = IGNORE_INDEX):
    """The ``data`` section's dataset for ``split`` (train / val / test)."""
    return build_segmentation_dataset(d.source, split, transform, img_size=d.img_size, num_samples=num_samples,
                                      reduce_zero_label=d.reduce_zero_label, ignore_index=ignore_index)


def check_classes(model: Segmentor, data, where: str) -> None:
    """One line if the data's class list does not match the segmentor's head."""
    k, found = model.config.num_classes, getattr(data, "num_classes", None)
    if found is not None and found != k:
        raise ValueError(f"{where} has {found} classes but the segmentor's head predicts {k}; evaluate with the class "
                         "list the model was trained on (or train a new head on this data)")


def eval_kwargs(e, d) -> dict:
    crop = e.crop_size or d.crop_size
    return dict(mode=e.mode, crop=crop, stride=e.stride or max(1, math.ceil(crop * 2 / 3)), flip=e.flip,
                ratios=tuple(e.ratios), test_scale=tuple(e.test_scale) if e.test_scale else None,
                batch_size=e.batch_size)


# ------------------------------------------------------------------------------------------------ train

def run(cfg, out=None, resume=False) -> dict:
    resolve_best_metric(cfg, BEST_METRICS, "mIoU")
    if cfg.train.distributed == "fsdp":
        raise ValueError("segment train supports train.distributed=ddp only (sliding-window evaluation runs a "
                         "different number of forward passes on each process, which FSDP cannot gather for)")
    d, e, s = cfg.data, cfg.eval, cfg.segment
    # the data before the run directory: a bad path or ignore index is one line that leaves nothing behind
    train_set = dataset(d, "train", train_transform(d, s.ignore_index), d.num_samples, s.ignore_index)
    env, run_dir = prepare_run(cfg, "segment", out, resume)
    seed_everything(cfg.train.seed)
    if d.source == "synthetic":
        log.info("data: the built-in SYNTHETIC segmentation set (11 classes). For real data pass --data DIR "
                 "(ADEChallengeData2016, or images/ + annotations/ + classes.json).")
    classes, palette = list(train_set.classes), list(getattr(train_set, "palette", None) or [])
    model = build_segmentor(cfg, len(classes), classes, palette or None)
    if env.enabled and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmseg's SyncBN; same state-dict keys
    val_split = e.split
    val_set = fixed_subset(dataset(d, val_split, seg_eval_transform(), ignore_index=s.ignore_index), e.max_samples)
    log.info(f"data: {len(train_set)} training images, {len(val_set)} {val_split} images, {len(classes)} classes "
             f"from {d.source}")
    objective = SegmentationObjective(model, SegmentationConfig.from_section(s))
    history: list[dict] = []
    kwargs = dict(eval_kwargs(e, d), num_classes=len(classes), ignore_index=s.ignore_index, classes=classes,
                  device=env.device, amp_dtype=torch.bfloat16 if cfg.train.precision == "bf16" else None,
                  num_workers=min(d.num_workers, 2), rank=env.rank, world_size=env.world_size)

    def evaluate(model, ema_model=None) -> dict:
        raw = evaluate_segmentation(model, val_set, **kwargs)
        row = {k: _num(raw[k]) for k in SCALARS}
        full = {"step": trainer.step, "n": raw["n"], **raw}
        if ema_model is not None:
            ema = evaluate_segmentation(ema_model, val_set, **kwargs)
            row.update({f"ema_{k}": _num(ema[k]) for k in SCALARS})
            full["ema"] = ema
        history.append(full)
        return row

    trainer = Trainer(objective, train_set, cfg.train, run_dir, env, num_workers=d.num_workers, evaluate=evaluate,
                      preset=None if cfg.model.backbone_init else cfg.model.name)
    done = resume_run(trainer, run_dir, resume)
    if done is not None:
        return done
    timing = fit_and_time(trainer, run_dir)
    final = history[-1]
    best = dict(trainer.best or {})
    results = {"final": final, "best": best or None, "best_checkpoint": str(run_dir / "best") if best else None,
               "num_classes": len(classes), "val_split": val_split, **timing, "data": str(d.source),
               "backbone_init": cfg.model.backbone_init, "eval": {k: v for k, v in eval_kwargs(e, d).items()}}
    barrier()
    if env.is_main:
        write_json(run_dir / "results.json", results)
        log.info(f"final {val_split}: mIoU {final['mIoU']:.2f}, mAcc {final['mAcc']:.2f}, aAcc {final['aAcc']:.2f}; "
                 f"results written to {run_dir / 'results.json'}")
    return results


def _num(v) -> float:
    return float("nan") if v is None else float(v)


# --------------------------------------------------------------------------------------- eval / predict

def evaluate_checkpoint(checkpoint, source, split: str = "val", mode: str = "slide", crop=None, stride=None,
                        flip: bool = False, ratios: Sequence[float] = (1.0,), test_scale=None, ema: bool = False,
                        device=None, bf16: bool = False, max_samples: Optional[int] = None, img_size: int = 32,
                        reduce_zero_label: Optional[bool] = None, batch_size: int = 1, num_workers: int = 2) -> dict:
    """Metrics of a segmentor checkpoint on a dataset split (see ``evaluate_segmentation``). Under torchrun every
    process evaluates its shard and all return the dataset-level numbers. ``crop`` defaults to the backbone's
    img_size, ``stride`` to 2/3 of the window."""
    from ..train.distributed import init_distributed

    env = init_distributed(device or "auto")
    model = load_segmentor(checkpoint, ema).to(env.device)
    ignore_index = model.config.ignore_index  # the label of unlabelled pixels in the masks it was trained on
    ds = build_segmentation_dataset(source, split, seg_eval_transform(), img_size=img_size,
                                    reduce_zero_label=reduce_zero_label, ignore_index=ignore_index)
    check_classes(model, ds, f"{source} ({split})")
    ds = fixed_subset(ds, max_samples)
    crop = crop or model.config.backbone["img_size"]
    res = evaluate_segmentation(model, ds, model.config.num_classes, mode, crop,
                                stride or max(1, math.ceil(crop * 2 / 3)), flip, ratios, test_scale, env.device,
                                torch.bfloat16 if bf16 else None, batch_size, num_workers, ignore_index,
                                classes=getattr(ds, "classes", None) or model.config.classes,
                                rank=env.rank, world_size=env.world_size)
    res.update(checkpoint=str(checkpoint), data=str(source), split=split, mode=mode, crop=crop, flip=flip,
               ratios=list(ratios), test_scale=list(test_scale) if test_scale else None)
    return res


def predict(checkpoint, images: Sequence[str], out_dir, classes_file=None, mode: str = "slide", crop=None,
            stride=None, flip: bool = False, ratios: Sequence[float] = (1.0,), test_scale=None, ema: bool = False,
            device: str = "cpu", alpha: float = 0.5) -> list[Path]:
    """For each image, ``<out>/<stem>_overlay.png`` (image blended with the class colours, legend on the right) and
    ``<stem>_labels.png`` (class indices). Class names / colours: ``classes_file``, else the checkpoint's."""
    from PIL import Image

    from ..data.images import open_rgb
    from ..data.segmentation import _default_palette, read_class_list
    from ..files import output_names

    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no image file {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                                "give existing image files to --images")
    stems = output_names(images)  # cat/0000.jpg and ship/0000.jpg must not write the same file
    model = load_segmentor(checkpoint, ema).to(device)
    K = model.config.num_classes
    names, colours = model.config.classes, model.config.palette
    if classes_file:
        names, colours = read_class_list(classes_file)
        if len(names) != K:
            raise ValueError(f"class list {classes_file} has {len(names)} classes but the segmentor's head predicts "
                             f"{K}; pass the class list it was trained with")
    names = names or [str(i) for i in range(K)]
    colours = colours or _default_palette(K)
    crop = crop or model.config.backbone["img_size"]
    tf = seg_eval_transform()
    written = []
    for path, stem in zip(images, stems):
        image = open_rgb(path)
        x, _ = tf(image, np.zeros((image.height, image.width), np.int64))
        probs = inference(model, x[None].to(device), mode, crop, stride or max(1, math.ceil(crop * 2 / 3)), flip,
                          ratios, test_scale)
        pred = probs.argmax(1)[0].cpu().numpy()
        overlay = overlay_image(image, pred, names, colours, alpha)
        written.append(save_png(overlay, Path(out_dir) / f"{stem}_overlay.png"))
        labels = Image.fromarray(pred.astype(np.uint8 if K <= 256 else np.uint16))
        written.append(save_png(labels, Path(out_dir) / f"{stem}_labels.png"))
    return written
