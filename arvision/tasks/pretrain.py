"""NEPA pretraining recipe: build the model, the objective and the data, train, then report kNN and
linear-probe accuracy of the pretrained backbone next to the same architecture at random initialisation.

    arvision pretrain                                         # built-in synthetic data (README: measured times)
    arvision pretrain --data /data/cifar10 train.epochs=50    # an image folder with train/ and test/
    torchrun --nproc_per_node 8 -m arvision pretrain --config nepa_b14_in1k_pretrain --data /data/in1k_hf
"""
from __future__ import annotations

import time
from functools import partial

import torch

from ..data import build_dataset, eval_transform, fixed_subset, pretrain_transform, resolve_split
from ..eval import FeatureSpec, attentive_probe, extract_features, extract_tokens, knn_classify, linear_probe
from ..files import write_json
from ..models import create_model
from ..objectives import NepaLossConfig, NepaObjective
from ..train.distributed import barrier
from ..train.engine import Trainer
from ..train.logging import log
from .common import build_backbone, fit_and_time, prepare_run, resume_run, seed_everything

MODEL_FAMILIES = ("nepa_vit",)  # what the NEPA objective trains: model.name and model.init must be one of them


def run(cfg, out=None, resume=False) -> dict:
    env, run_dir = prepare_run(cfg, "pretrain", out, resume)
    seed_everything(cfg.train.seed)
    ocfg = NepaLossConfig.from_dict(dict(cfg.objective))
    model = build_backbone(cfg.model, MODEL_FAMILIES, **({"use_mask_token": True} if ocfg.mask_ratio > 0 else {}))
    img_size = cfg.data.img_size or model.config.img_size
    source = cfg.data.source
    if source == "synthetic":
        log.info("data: the built-in SYNTHETIC shapes dataset (generated on the fly, 10 classes). "
                 "For real data pass --data DIR (image folder with train/ and val/ or test/) or data.source=DIR.")
    train_set = build_dataset(source, "train", pretrain_transform(img_size, tuple(cfg.data.crop_scale), cfg.data.hflip, uint8=True),
                              img_size=img_size, num_samples=cfg.data.num_samples)
    log.info(f"data: {len(train_set)} training images from {source}")
    objective = NepaObjective(model, ocfg)
    trainer = Trainer(objective, train_set, cfg.train, run_dir, env, num_workers=cfg.data.num_workers,
                      preset=cfg.model.name)
    done = resume_run(trainer, run_dir, resume)
    if done is not None:
        return done
    t0 = time.perf_counter()
    results = {**fit_and_time(trainer, run_dir), "data": source}
    if cfg.eval.knn:
        probed = trainer.full_model()  # unsharded on the main process (a collective under FSDP), None elsewhere
        if env.is_main:
            results["probes"] = probe_report(cfg, probed, img_size, env.device)
    barrier()
    results["total_minutes"] = (time.perf_counter() - t0) / 60  # training and probes
    if env.is_main:
        write_json(run_dir / "results.json", results)
        log.info(f"results written to {run_dir / 'results.json'}; loss curve: {run_dir / 'loss_curve.png'}")
    return results


def probe_report(cfg, model, img_size: int, device) -> dict:
    """kNN (and, with eval.linear, linear-probe) top-1 of several block selections, pretrained vs the same
    architecture at random init. Features are extracted once per model and block selection."""
    source, e = cfg.data.source, cfg.eval
    val_split = resolve_split(source, "val")
    tf = eval_transform(img_size)
    train_set = build_dataset(source, "train", tf, img_size=img_size, num_samples=e.train_samples)
    val_set = build_dataset(source, val_split, tf, img_size=img_size, num_samples=e.val_samples)
    train_set, val_set = fixed_subset(train_set, e.train_samples), fixed_subset(val_set, e.val_samples)
    loader = partial(torch.utils.data.DataLoader, batch_size=256, num_workers=cfg.data.num_workers)
    torch.manual_seed(cfg.train.seed)
    random_model = create_model(cfg.model.name, **dict(cfg.model.args or {})).to(device)
    amp = torch.bfloat16 if cfg.train.precision == "bf16" else None
    report, lines = {}, []
    for blocks in e.blocks:
        spec = FeatureSpec.parse(blocks=str(blocks), pool=e.pool, depth=len(model.blocks))
        row = {}
        for name, m in (("pretrained", model), ("random_init", random_model)):
            phase = f"probe block {blocks}, {name.replace('_', ' ')}:"
            tr = extract_features(m, loader(train_set), spec, device, amp, desc=f"{phase} train features")
            te = extract_features(m, loader(val_set), spec, device, amp, desc=f"{phase} {val_split} features")
            row[f"knn_{name}"] = knn_classify(*tr, *te, k=e.knn_k, temperature=e.knn_temperature)["top1"]
            if e.linear:
                row[f"linear_{name}"] = linear_probe(*tr, *te, epochs=e.linear_epochs, seed=cfg.train.seed,
                                                     progress=True)["top1"]
            if e.attentive:
                tr, te = (extract_tokens(m, loader(ds), spec, device, amp, desc=f"{phase} {split} tokens")
                          for ds, split in ((train_set, "train"), (val_set, val_split)))
                row[f"attentive_{name}"] = attentive_probe(*tr, *te, epochs=e.attentive_epochs,
                                                           seed=cfg.train.seed, progress=True)["top1"]
        report[str(blocks)] = row
        line = f"  block {str(blocks):>6}: kNN {row['knn_pretrained']:5.1f}% vs {row['knn_random_init']:5.1f}%"
        for probe in ("linear", "attentive"):
            if e[probe]:
                line += f"   {probe} {row[f'{probe}_pretrained']:5.1f}% vs {row[f'{probe}_random_init']:5.1f}%"
        lines.append(line)
    log.info(f"top-1 of the pretrained backbone vs the same architecture at random init (kNN k={e.knn_k}; "
             f"{len(train_set)} train / {len(val_set)} {val_split} images"
             f"{', synthetic data' if source == 'synthetic' else ''}):\n" + "\n".join(lines))
    return report
