"""Heptapod training recipe: a generator over a token cache, trained by the one Trainer, then a grid of samples.

    arvision tokenizer encode --data /data/cifar10 --tokenizer runs/vq/checkpoints/step_00002000 --out cache/c10
    arvision heptapod train --data cache/c10 train.epochs=20
    arvision heptapod train --data cache/c10 objective.target_set=next model.args.head_type=none    # NTP baseline
    torchrun --nproc_per_node 8 -m arvision heptapod train --config heptapod_h_in256 --data cache/in256_kl16
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..checkpoints import load_model
from ..data.token_cache import TokenCache
from ..models import create_model
from ..objectives.heptapod import HeptapodLossConfig, HeptapodObjective
from ..train.distributed import barrier
from ..train.engine import Trainer
from ..train.logging import log
from .common import finished_results, prepare_run, seed_everything


def generator_args(cache: TokenCache, model_cfg) -> dict:
    """Preset overrides that make the generator match the cache's tokens (token type, codebook / channels, grid,
    classes); an explicit model.args value that contradicts the cache is a one-line error."""
    info = cache.info
    args = dict(grid_size=info["grid_size"], num_classes=info["num_classes"], token_type=info["token_type"])
    if info["token_type"] == "discrete":
        args["codebook_size"] = info["codebook_size"]
    else:
        args["latent_channels"] = info["latent_channels"]
    for key, value in dict(model_cfg.args or {}).items():
        if key in args and args[key] != value:
            raise ValueError(f"model.args.{key}={value} contradicts the token cache ({key}={args[key]}); drop the "
                             "override or encode the data with the tokenizer you mean")
    return {**dict(model_cfg.args or {}), **args}


def build_generator(cfg, cache: TokenCache):
    args = generator_args(cache, cfg.model)
    if cfg.model.init:
        model = load_model(cfg.model.init, family="heptapod")
        stored = model.config.to_dict()
        bad = {k: (stored[k], v) for k, v in args.items() if stored.get(k) != v}
        if bad:
            raise ValueError(f"{cfg.model.init} does not fit the token cache: {bad} (checkpoint, cache); use a "
                             "matching cache or train from a preset")
        model.train()
    else:
        model = create_model(cfg.model.name, **args)
    if cfg.model.backbone_init:
        init_backbone_from_nepa(model, cfg.model.backbone_init)
    if cfg.model.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
        if hasattr(model, "head"):
            model.head.set_grad_checkpointing(True)
    return model


def init_backbone_from_nepa(model, source) -> None:
    """Copy a NEPA checkpoint's blocks into the causal backbone (the same trunk layout; widths must match)."""
    nepa = load_model(source, family="nepa_vit")
    src, dst = nepa.state_dict(), model.backbone.state_dict()
    picked = {k: v for k, v in src.items() if k.startswith("blocks.")}
    shape_bad = [k for k, v in picked.items() if k not in dst or dst[k].shape != v.shape]
    if shape_bad or len(picked) != sum(k.startswith("blocks.") for k in dst):
        raise ValueError(f"{source} does not fit the generator backbone ({model.config.embed_dim} wide, "
                         f"{model.config.depth} blocks): {shape_bad[:3] or 'different depth'}; pick a NEPA model "
                         "with the same width, depth, heads, MLP and QK-Norm")
    model.backbone.load_state_dict(picked, strict=False)
    log.info(f"causal backbone initialised from the NEPA blocks of {source}")


def run(cfg, out=None, resume=False) -> dict:
    if not cfg.data.source:
        raise ValueError("heptapod train needs a token cache: --data CACHE (make one with `arvision tokenizer "
                         "encode --data DIR --tokenizer TOK --out CACHE`)")
    cache = TokenCache(cfg.data.source)
    seed_everything(cfg.train.seed)
    model = build_generator(cfg, cache)  # before the run directory exists: a mismatch leaves nothing behind
    env, run_dir = prepare_run(cfg, "heptapod", out, resume)
    log.info(f"data: {len(cache)} token grids from {cfg.data.source} ({cache.info['token_type']}, "
             f"{cache.info['grid_size']}x{cache.info['grid_size']}, {cache.info['num_classes']} classes)")
    objective = HeptapodObjective(model, HeptapodLossConfig(**cfg.objective))
    trainer = Trainer(objective, cache, cfg.train, run_dir, env, num_workers=cfg.data.num_workers,
                      preset=cfg.model.name)
    if resume:
        trainer.resume()
        done = finished_results(trainer, run_dir)
        if done is not None:
            return done
    t0 = time.perf_counter()
    trainer.fit()
    results = {"train_minutes": (time.perf_counter() - t0) / 60, "steps": trainer.step, "run_dir": str(run_dir),
               "data": str(cfg.data.source)}
    generator = trainer.full_model()
    if env.is_main and cfg.sample.num_per_class > 0:
        results["samples"] = write_samples(generator, cache, cfg.sample, run_dir)
    barrier()
    if env.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        log.info(f"results written to {run_dir / 'results.json'}")
    return results


def write_samples(model, cache: TokenCache, scfg, run_dir: Path) -> dict:
    from ..generate.outputs import class_labels, generate_images, save_grid, save_npz
    from ..generate.sample import SamplingConfig

    tokenizer = cache.load_tokenizer()
    model = model.eval()
    labels = class_labels(range(model.config.num_classes), scfg.num_per_class, scfg.seed)
    sampling = SamplingConfig(temperature=scfg.temperature, top_k=scfg.top_k, top_p=scfg.top_p,
                              diffusion_steps=scfg.diffusion_steps, diffusion_temperature=scfg.diffusion_temperature)
    images = generate_images(model, tokenizer, labels, sampling, scfg.batch_size, scfg.seed, cache.scale_factor)
    grid = save_grid(images, labels, run_dir / "samples.png")
    npz = save_npz(images, labels, run_dir / "samples.npz")
    log.info(f"samples: {grid} and {npz}")
    return {"grid": str(grid), "npz": str(npz), "count": int(labels.shape[0])}
