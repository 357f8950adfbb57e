"""Heptapod training recipe: a generator over a token cache, trained by the one Trainer, then a grid of samples.

    arvision tokenizer encode --data /data/cifar10 --tokenizer runs/vq/checkpoints/step_00002000 --out cache/c10
    arvision heptapod train --data cache/c10 train.epochs=20
    arvision heptapod train --data cache/c10 objective.target_set=next model.args.head_type=none    # NTP baseline
    torchrun --nproc_per_node 8 -m arvision heptapod train --config heptapod_h_in256 --data cache/in256_kl16
"""
from __future__ import annotations

import json
from pathlib import Path

from ..checkpoints import load_model
from ..data.token_cache import TokenCache
from ..eval.judge import OnlineScore, judge_accuracy, load_judge, score_npz
from ..eval.token_nll import held_out_nll
from ..models import create_model
from ..objectives.heptapod import HeptapodLossConfig, HeptapodObjective
from ..train.distributed import barrier
from ..train.engine import Trainer
from ..train.logging import log
from .common import fit_and_time, prepare_run, resume_run, seed_everything

# The recipe `arvision heptapod train` runs when no data is given (no --data, data.source or --config, not resuming):
# the generation quick start on the built-in digits, which makes its own token cache.
RECIPE_WITHOUT_DATA = "heptapod_quickstart"


def generator_args(cache: TokenCache, model_cfg) -> dict:
    """Preset overrides that make the generator match the cache's tokens (token type, codebook / channels, grid,
    classes); an explicit model.args value that contradicts the cache is a one-line error."""
    args = cache.generator_fields()
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


def run(cfg, out=None, resume=False) -> dict:
    """Train on the token cache ``data.source``; with none, the generation quick start on the built-in digits."""
    if not cfg.data.source:
        from .generation_quickstart import run_quickstart

        return run_quickstart(cfg, out, resume)
    return train_generator(cfg, TokenCache(cfg.data.source), out, resume)


def train_generator(cfg, cache: TokenCache, out=None, resume=False) -> dict:
    """The generator on ``cache``, then ``sample.num_per_class`` samples per class. Every ``train.eval_every`` epochs
    (and after the last step) ``online.num_per_class`` samples per class are drawn: a grid in samples/ and, with an
    ``online.judge`` classifier, their sample accuracy and FD in metrics.jsonl; the final samples are scored by the
    judge too (results.json ``score``)."""
    seed_everything(cfg.train.seed)
    model = build_generator(cfg, cache)  # before the run directory exists: a mismatch leaves nothing behind
    env, run_dir = prepare_run(cfg, "heptapod", out, resume)
    if cfg.model.backbone_init:  # said here, where the run's log exists (the model is built before it)
        log.info(f"causal backbone initialised from the NEPA blocks of {cfg.model.backbone_init}")
    log.info(f"data: {len(cache)} token grids from {cache.path} ({cache.info['token_type']}, "
             f"{cache.info['grid_size']}x{cache.info['grid_size']}, {cache.info['num_classes']} classes)")
    objective = HeptapodObjective(model, HeptapodLossConfig.from_dict(dict(cfg.objective)))
    judge = load_judge(cfg.online.judge) if cfg.online.judge else None
    evaluate = online_evaluation(cache, cfg, run_dir, judge, lambda: trainer.step) \
        if env.is_main and not env.enabled and cfg.online.num_per_class > 0 else None
    trainer = Trainer(objective, cache, cfg.train, run_dir, env, num_workers=cfg.data.num_workers,
                      preset=cfg.model.name, evaluate=evaluate)
    done = resume_run(trainer, run_dir, resume)
    if done is not None:
        return done
    results = {**fit_and_time(trainer, run_dir), "data": str(cache.path)}
    generator = trainer.full_model(ema=True)  # the EMA weights when train.ema_decay > 0, as MAR and DiT sample
    if env.is_main:
        # teacher-forced loss of z_{t,t} on 256 fixed training grids, per row (`arvision eval nll` on held-out ones)
        results["next_loss_by_row"] = held_out_nll(generator, cache, num=256, loss_config=objective.config)["by_row"]
        log.info("next-token loss by grid row: " + " ".join(f"{v:.3f}" for v in results["next_loss_by_row"]))
    if env.is_main and cfg.sample.num_per_class > 0:
        results["samples"] = write_samples(generator, cache, cfg.sample, run_dir)
        results["samples"]["weights"] = "ema" if trainer.ema is not None else "model"
        if judge is not None:
            results["score"] = dict(score_npz(results["samples"]["npz"], judge, cfg.online.reference,
                                              cfg.online.num_ref),
                                    judge=str(cfg.online.judge),
                                    judge_real_accuracy=judge_accuracy(judge, cfg.online.reference,
                                                                       num=cfg.online.num_ref))
            log.info("score: " + ", ".join(f"{k} {v:.4g}" for k, v in results["score"].items()
                                           if isinstance(v, float)))
    barrier()
    if env.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        log.info(f"results written to {run_dir / 'results.json'}")
    return results


def sampling_config(scfg):
    from ..generate.sample import SamplingConfig

    return SamplingConfig(temperature=scfg.temperature, top_k=scfg.top_k, top_p=scfg.top_p,
                          diffusion_steps=scfg.diffusion_steps, diffusion_temperature=scfg.diffusion_temperature,
                          diffusion_variance=scfg.diffusion_variance, precision=scfg.precision)


def online_evaluation(cache: TokenCache, cfg, run_dir: Path, judge, step):
    """The Trainer's ``evaluate``: a small per-class grid of the current weights (samples/step_*.png and the
    tracker's ``eval/samples`` image) and, with a judge, sample accuracy / FD (MAR's --online_eval). Its own seed: the same weights give the same samples."""
    from ..generate.outputs import class_grid, class_labels, generate_images, save_image

    tokenizer = cache.load_tokenizer().eval()
    score = None
    if cfg.online.reference:
        from ..metrics.extractors import build_extractor

        extractor = judge if judge is not None else build_extractor(cfg.online.extractor or "fid-helper")
        size = cache.info.get("img_size") or 32
        score = OnlineScore(extractor, cfg.online.reference, cfg.online.num_ref, img_size=size,
                            stats_file=run_dir / "online_reference_stats.npz")
    n = cfg.online.num_per_class

    def evaluate(model, ema_model=None) -> dict:
        net = (ema_model if ema_model is not None else model)
        was_training = net.training
        net.eval()
        labels = class_labels(range(net.config.num_classes), n, cfg.sample.seed)
        images = generate_images(net, tokenizer, labels, sampling_config(cfg.sample), cfg.sample.batch_size,
                                 cfg.sample.seed, cache.scale_factor, progress=False)
        net.train(was_training)
        grid = class_grid(images, labels)
        save_image(grid, run_dir / "samples" / f"step_{step():08d}.png")
        return {**(score(images, labels) if score is not None else {}), "samples": grid}

    return evaluate


def write_samples(model, cache: TokenCache, scfg, run_dir: Path) -> dict:
    from ..files import write_image_npz
    from ..generate.outputs import class_labels, generate_images, save_grid

    tokenizer = cache.load_tokenizer()
    model = model.eval()
    labels = class_labels(range(model.config.num_classes), scfg.num_per_class, scfg.seed)
    images = generate_images(model, tokenizer, labels, sampling_config(scfg), scfg.batch_size, scfg.seed,
                             cache.scale_factor)
    grid = save_grid(images, labels, run_dir / "samples.png", per_row=min(scfg.num_per_class, 16), labelled=True,
                     class_names=cache.info.get("classes"))
    npz = write_image_npz(run_dir / "samples.npz", images, labels)
    log.info(f"samples: {grid} and {npz}")
    return {"grid": str(grid), "npz": str(npz), "count": int(labels.shape[0])}
