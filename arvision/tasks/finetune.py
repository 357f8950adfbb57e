"""Supervised fine-tuning recipe (nepa_spec.md §5): a NEPA backbone (pretrained checkpoint or a preset from scratch) gets
a zero-initialised classifier, bidirectional attention, a frozen patch embedding, layer-wise lr decay with the
official inverted per-group warmup, Mixup/CutMix with label smoothing, RandAugment and a weight EMA. Raw and EMA
weights are evaluated every ``train.eval_every`` epochs; the best by ``train.best_metric`` is saved to ``<run>/best``.

    arvision finetune                                                      # synthetic data, tiny model, CPU minutes
    arvision finetune --data /data/cifar10 model.init=runs/pretrain-x/checkpoints/step_00001000
    torchrun --nproc_per_node 8 -m arvision finetune --config nepa_b14_in1k_finetune --data /data/in1k_hf
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader

from ..data import build_dataset, eval_transform, finetune_transform, fixed_subset, labelled_subset, resolve_split
from ..data.workers import ignore_stop_signals
from ..eval.classify import evaluate_classifier
from ..eval.sharding import EvalShard
from ..files import write_json
from ..objectives.classification import ClassificationConfig, ClassificationObjective
from ..train.distributed import DistEnv, barrier
from ..train.engine import Trainer
from ..train.logging import log
from .common import build_backbone, fit_and_time, prepare_run, resolve_best_metric, resume_run, seed_everything

MODEL_FAMILIES = ("nepa_vit",)  # the classifiers fine-tuning trains: model.name and model.init must be one of them

BEST_METRICS = ("top1", "top5", "ema_top1", "ema_top5")


def run(cfg, out=None, resume=False) -> dict:
    resolve_best_metric(cfg, BEST_METRICS, "top1")
    if cfg.eval.resize is not None and cfg.eval.crop_pct is not None:
        raise ValueError("set eval.resize or eval.crop_pct, not both")
    env, run_dir = prepare_run(cfg, "finetune", out, resume)
    seed_everything(cfg.train.seed)
    d, ft, e = cfg.data, cfg.finetune, cfg.eval
    model = build_model(cfg)
    img_size = d.img_size or model.config.img_size
    if d.source == "synthetic":
        log.info("data: the built-in SYNTHETIC shapes dataset (10 classes). For real data pass --data DIR (image "
                 "folder with train/ and val/ or test/ class folders, or a Hugging Face save_to_disk folder).")
    train_set = labelled_subset(build_dataset(d.source, "train", train_transform(d, img_size), img_size=img_size,
                                              num_samples=d.num_samples), d.label_fraction)
    found = len(getattr(train_set, "classes", []))
    num_classes = ft.num_classes or found
    if not num_classes:
        raise ValueError(f"cannot tell the number of classes of {d.source} (no labels?); set finetune.num_classes")
    if found > num_classes:
        raise ValueError(f"{d.source} has {found} classes but finetune.num_classes={num_classes}; raise it or leave "
                         "it null (the number of classes in the data)")
    prepare_classifier(model, num_classes, ft.global_pool, ft.freeze_patch_embed)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size // env.world_size
    if (ft.mixup > 0 or ft.cutmix > 0) and micro % 2:
        raise ValueError(f"mixup/cutmix needs an even per-process micro-batch, got {micro}; change train.batch_size "
                         "or train.micro_batch_size")
    val_split = resolve_split(d.source, e.split)
    val_set = fixed_subset(build_dataset(d.source, val_split, eval_transform(img_size, e.resize, e.crop_pct),
                                    img_size=img_size), e.max_samples)
    log.info(f"data: {len(train_set)} training images, {len(val_set)} {val_split} images, {num_classes} classes "
             f"from {d.source}")

    objective = build_objective(ft, model, num_classes)
    evaluate, history = make_evaluator(val_set, env, cfg, step=lambda: trainer.step)
    trainer = Trainer(objective, train_set, cfg.train, run_dir, env, num_workers=d.num_workers,
                      evaluate=evaluate, preset=None if cfg.model.init else cfg.model.name)
    done = resume_run(trainer, run_dir, resume)
    if done is not None:
        return done
    timing = fit_and_time(trainer, run_dir)
    final = history[-1]  # the Trainer always evaluates after the last step
    best = dict(trainer.best or {})  # the best evaluation's metrics, kept by the Trainer across resumes
    best.update(next((r for r in history if r["step"] == best.get("step")), {"n": final["n"]} if best else {}))
    results = {"final": final, "best": best or None, "best_checkpoint": str(run_dir / "best") if best else None,
               "num_classes": num_classes, "val_split": val_split, "val_images": final["n"],
               "causal": ft.causal, **timing, "data": str(d.source), "init": cfg.model.init}
    barrier()
    if env.is_main:
        write_json(run_dir / "results.json", results)
        summary = ", ".join(f"{k} {final[k]:.2f}" for k in ("top1", "top5", "ema_top1", "ema_top5") if k in final)
        log.info(f"final {val_split}: {summary}; results written to {run_dir / 'results.json'}")
    return results


def build_model(cfg):
    """The backbone (preset from scratch, or ``model.init`` checkpoint) with the fine-tune drop path and attention."""
    extra = dict(drop_path_rate=cfg.finetune.drop_path_rate, causal=cfg.finetune.causal)
    if cfg.model.init and cfg.model.init_ema:
        extra["ema"] = True  # load_model's argument: the checkpoint's EMA weights
    return build_backbone(cfg.model, MODEL_FAMILIES, **extra)


def prepare_classifier(model, num_classes: int, global_pool: str = "avg", freeze_patch_embed: bool = True):
    """Give ``model`` a ``num_classes`` head unless it has one: zero classifier, fc_norm (1, 0) (nepa_spec.md §6).
    Freezing affects the conv patch embedding only; the CLS token stays trainable (nepa_spec.md §5.1). A mask token
    left by masked pretraining is dropped: a classifier never uses it (DDP would fail on the unused parameter)."""
    if (model.config.num_classes, model.config.global_pool) != (num_classes, global_pool):
        model.reset_classifier(num_classes, global_pool)
    if getattr(model, "mask_token", None) is not None:
        model.drop_mask_token()
    model.patch_embed.requires_grad_(not freeze_patch_embed)
    return model


def build_objective(ft, model, num_classes: int) -> ClassificationObjective:
    """The fine-tuning objective of the ``finetune`` config section: Mixup/CutMix, label smoothing, attention mode
    and layer-wise lr decay (``llrd_groups``) as its ``param_groups``."""
    return ClassificationObjective(model, num_classes, ClassificationConfig.from_section(ft))


def train_transform(d, img_size: int):
    return finetune_transform(img_size, auto_augment=d.auto_augment or None, re_prob=d.re_prob,
                              interpolation=d.interpolation, scale=tuple(d.crop_scale))


def make_evaluator(val_set, env: DistEnv, cfg, step: Callable[[], int] = lambda: 0):
    """The Trainer's ``evaluate(model, ema_model) -> {top1, top5, loss, ema_top1, ...}`` and the list of every row
    it has produced, with 'n' (images) and 'step' (from ``step()``). Each rank evaluates its shard of ``val_set``."""
    loader = DataLoader(EvalShard(val_set, env.rank, env.world_size), batch_size=cfg.eval.batch_size,
                        num_workers=cfg.data.num_workers, pin_memory=env.device.type == "cuda",
                        worker_init_fn=ignore_stop_signals)  # a SIGTERM during evaluation is the Trainer's
    amp = torch.bfloat16 if cfg.train.precision == "bf16" else None
    causal = cfg.finetune.causal
    history: list[dict] = []

    def evaluate(model, ema_model=None) -> dict:
        raw = evaluate_classifier(model, loader, env.device, amp, causal)
        row = {k: raw[k] for k in ("top1", "top5", "loss")}
        if ema_model is not None:
            ema = evaluate_classifier(ema_model, loader, env.device, amp, causal)
            row.update({f"ema_{k}": ema[k] for k in ("top1", "top5", "loss")})
        history.append(dict(row, n=raw["n"], step=step()))
        return row

    return evaluate, history
