"""Tokenizer recipes: train a VQ / KL tokenizer with the one Trainer, watching its reconstructions as it learns, and
evaluate the result at the end (``arvision.eval.tokenizer``).

    arvision tokenizer train --config cifar10_tokenizer_vq --data /data/cifar10 --out runs/vq
    arvision tokenizer eval runs/vq/checkpoints/step_00002000 --data /data/cifar10 --fid
    arvision tokenizer reconstruct kl16.ckpt --images a.png b.png --out recon.png --img-size 256
    arvision tokenizer encode --data /data/cifar10 --tokenizer runs/vq/last --out cache/c10
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..data import build_dataset, fixed_subset
from ..data.transforms import generation_transform, unit_range_to_uint8
from ..eval.tokenizer import evaluate_tokenizer
from ..files import write_json
from ..objectives.tokenizer import TokenizerLossConfig, TokenizerObjective, psnr
from ..train.distributed import barrier
from ..train.engine import Trainer
from ..train.logging import log
from .common import fit_and_time, prepare_run, resume_run, seed_everything


class UnitRange:
    """uint8 (3, H, W) -> float in [-1, 1] (picklable, for DataLoader workers)."""

    def __init__(self, base):
        self.base = base

    def __call__(self, img):
        return self.base(img).float().div_(127.5).sub_(1.0)


def image_set(source, split: str, img_size: int, random_flip: float = 0.0, num_samples: Optional[int] = None):
    """Centre-cropped (ADM ``center_crop_arr``) images in [-1, 1] with labels."""
    return build_dataset(source, split, UnitRange(generation_transform(img_size, random_flip=random_flip)),
                         img_size=img_size, num_samples=num_samples)


def online_reconstruction(val_set, run_dir: Path, step, write: bool, grid_n: int = 16):
    """The Trainer's ``evaluate`` for a tokenizer: PSNR (and for VQ the codebook usage) of the fixed held-out images
    ``val_set``, and a grid of ``grid_n`` originals beside their reconstructions (samples/step_*.png and the tracker's
    ``eval/reconstructions`` image), so a run can be watched as it learns. Every rank computes the same numbers;
    ``write``: this rank writes the grid."""
    from ..generate.outputs import save_image, tile_images

    images = torch.stack([val_set[i][0] for i in range(len(val_set))])

    @torch.no_grad()
    def evaluate(model, ema_model=None) -> dict:
        net = ema_model if ema_model is not None else model
        was_training = net.training
        net.eval()
        x = images.to(next(net.parameters()).device)
        codes = torch.cat([net.encode(x[s:s + 64]) for s in range(0, len(x), 64)])
        y = torch.cat([net.decode(codes[s:s + 64]).float() for s in range(0, len(x), 64)])
        net.train(was_training)
        res = {"psnr": float(psnr(y, x))}
        if net.token_type == "discrete":
            res["codebook_usage"] = float(codes.unique().numel() / net.codebook_size)
        pairs = torch.stack([unit_range_to_uint8(x[:grid_n]), unit_range_to_uint8(y[:grid_n])], 1).permute(0, 1, 3, 4, 2)  # n, 2, HWC
        grid = tile_images([pairs[r:r + 4].flatten(0, 1) for r in range(0, len(pairs), 4)], per_row=8)
        if write:
            save_image(grid, Path(run_dir) / "samples" / f"step_{step():08d}.png")
        return {**res, "reconstructions": grid}

    return evaluate


def build_tokenizer(model_cfg):
    """A registered tokenizer preset with overrides, or (``model.init``) a tokenizer to fine-tune."""
    from ..models import create_model
    from ..checkpoints import load_tokenizer

    args = dict(model_cfg.args or {})
    if model_cfg.init:
        if args:
            raise ValueError("model.args cannot change a tokenizer loaded from model.init; drop them")
        model = load_tokenizer(model_cfg.init).train()
        log.info(f"tokenizer initialised from {model_cfg.init}")
    else:
        from ..models.registry import check_preset
        model = create_model(check_preset(model_cfg.name, ("vq_tokenizer", "kl_tokenizer")), **args)
    log.info(f"tokenizer {model_cfg.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return model


def run(cfg, out=None, resume=False) -> dict:
    env, run_dir = prepare_run(cfg, "tokenizer", out, resume)
    seed_everything(cfg.train.seed)
    model = build_tokenizer(cfg.model)
    d = cfg.data
    if d.source == "synthetic":
        log.info("data: the built-in SYNTHETIC shapes dataset; pass --data DIR for real images")
    train_set = image_set(d.source, "train", d.img_size, d.hflip, d.num_samples)
    log.info(f"data: {len(train_set)} training images from {d.source} at {d.img_size} px "
             f"({model.grid_size(d.img_size)}x{model.grid_size(d.img_size)} tokens)")
    objective = TokenizerObjective(model, TokenizerLossConfig.from_dict(dict(cfg.objective)))
    evaluate = None
    if cfg.train.eval_every and cfg.eval.online_images:
        held_out = fixed_subset(image_set(d.source, "val", d.img_size), cfg.eval.online_images)
        evaluate = online_reconstruction(held_out, run_dir, lambda: trainer.step, env.is_main)
    trainer = Trainer(objective, train_set, cfg.train, run_dir, env, num_workers=d.num_workers, preset=cfg.model.name,
                      evaluate=evaluate)
    done = resume_run(trainer, run_dir, resume)
    if done is not None:
        return done
    results = {**fit_and_time(trainer, run_dir), "data": str(d.source), "img_size": d.img_size}
    tok = trainer.full_model()
    if env.is_main and cfg.eval.num_images:
        e = cfg.eval
        val = fixed_subset(image_set(d.source, "val", d.img_size), e.num_images)
        results["eval"] = evaluate_tokenizer(tok, val, e.batch_size, d.num_workers, env.device, e.fid, e.extractor,
                                             run_dir / "reconstructions.png")
        log.info("tokenizer eval: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in results["eval"].items()))
    barrier()
    if env.is_main:
        write_json(run_dir / "results.json", results)
        log.info(f"results written to {run_dir / 'results.json'}")
    return results
