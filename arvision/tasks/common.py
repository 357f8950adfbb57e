"""Shared set-up for task recipes: run directory, seeding, logging, model construction."""
from __future__ import annotations

import copy
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import default_config, save_config
from ..models import create_model
from ..models.registry import check_preset
from ..train.checkpoint import latest_checkpoint
from ..train.distributed import DistEnv, init_distributed
from ..train.logging import log, open_log_file, setup_logging
from ..train.run_directory import defer_run_directory, record_run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


PATH_KEYS = ("source", "init", "backbone_init", "judge", "reference")  # and every key ending in _path


def absolute_paths(cfg) -> None:
    """Make the config's relative file paths absolute (data.source, model.init, ..., *_path), so the saved config
    still finds them from any directory (``arvision sample`` reads the token cache of a run's config)."""
    from ..data import is_synthetic
    from ..data.shards import is_shard_source

    for key, value in list(cfg.items()):
        if isinstance(value, dict):
            absolute_paths(value)
        elif ((key in PATH_KEYS or str(key).endswith("_path")) and isinstance(value, str) and value
              and not is_synthetic(value) and not os.path.isabs(value)
              and (os.path.exists(value) or is_shard_source(value))):  # a brace pattern names no file
            cfg[key] = os.path.abspath(value)


def prepare_run(cfg, task: str, out: Optional[str], resume: bool) -> tuple[DistEnv, Path]:
    """Initialise distributed, pick and check the run directory, save the resolved config, set up logs. On resume the
    run's saved config is the reference: a change to a key that cannot change is a one-line error before anything is
    written (``check_resume_config``); the changes that can are logged."""
    absolute_paths(cfg)
    env = init_distributed()
    if out is None:
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        if env.enabled:
            dist.broadcast_object_list(stamp, src=0)
        out = f"runs/{task}-{stamp[0]}"
    run_dir = Path(out)
    changed = check_resume_config(cfg, run_dir, task) if resume else []
    if resume and latest_checkpoint(run_dir) is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}/checkpoints; start without --resume")
    if env.is_main:
        if latest_checkpoint(run_dir) is not None and not resume:
            raise FileExistsError(f"run directory {run_dir} already holds checkpoints; pass --resume to continue it "
                                  f"or choose another --out")
        # Nothing is written until training starts (Trainer.fit): a task that fails on its data, model or settings
        # before then leaves no run directory behind.
        resolved = copy.deepcopy(cfg)
        defer_run_directory(run_dir, lambda d: (save_config(resolved, d / "config.yaml"), record_run(d, task),
                                                open_log_file(d)))
    if env.enabled:
        dist.barrier()
    setup_logging(env.is_main, run_dir, hold_file=True)
    if changed:
        log.info("resuming with a changed config: " + ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in changed))
    if env.device.type == "cuda":  # TF32 matmuls for any fp32 work left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return env, run_dir


# Keys a resumed run cannot change: they define the model, the objective, the data stream (samples, order,
# augmentations), the global batch, the random streams and what "best" means. Every other key (max steps / epochs, lr,
# schedule and optimizer settings, logging, checkpoints, evaluation, workers, precision, distribution) may change on
# --resume and is applied from the resumed step on.
FIXED_ON_RESUME = ("model.", "objective.", "finetune.", "segment.", "data.", "train.batch_size", "train.seed",
                   "train.ema_decay", "train.ema_warmup_power", "train.best_metric")
CHANGEABLE_ON_RESUME = ("data.num_workers", "model.grad_checkpointing")


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)  # one folder named by two paths (relative / absolute)
    return False


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def is_fixed_on_resume(key: str) -> bool:
    return key not in CHANGEABLE_ON_RESUME and any(
        key.startswith(f) if f.endswith(".") else key == f for f in FIXED_ON_RESUME)


def read_saved_config(run_dir) -> Optional[dict]:
    """The config a run saved (``run_dir/config.yaml``), None when there is none; an unreadable one is a one-line
    ValueError."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        return None
    import yaml
    try:
        return yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--resume: {saved_path} is not readable YAML ({str(e).splitlines()[0]}); restore it or "
                         "start a new run with another --out") from None


def check_resume_config(cfg, run_dir: Path, task: str) -> list[tuple[str, Any, Any]]:
    """The (key, saved value, new value) of every key that ``cfg`` changes from the config saved in ``run_dir``
    (none when there is no saved config); a one-line ValueError naming the keys that cannot change on resume.

    A key the saved config lacks (added to arvision after the run started) is unchanged while it keeps ``task``'s
    default: a new key's default is the behaviour from before it existed."""
    saved = read_saved_config(run_dir)
    if saved is None:
        return []
    old, new = _leaves(saved), _leaves(dict(cfg))
    defaults = _leaves(default_config(task))

    def is_new_key_at_default(k):
        return k not in old and k in defaults and _same(defaults[k], new.get(k))

    changed = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
               if not _same(old.get(k), new.get(k)) and not is_new_key_at_default(k)]
    fixed = [c for c in changed if is_fixed_on_resume(c[0])]
    if fixed:
        shown = "; ".join(f"{k} (saved {_show(a)}, now {_show(b)})" for k, a, b in fixed)
        raise ValueError(f"--resume: {', '.join(k for k, _, _ in fixed)} cannot change on resume: {shown}; resume "
                         f"with the values in {Path(run_dir) / 'config.yaml'}, or start a new run with another --out")
    return changed


def fit_and_time(trainer, run_dir: Path) -> dict:
    """Train to the last step; what every task's results report of it: the minutes it trained, the steps and the run
    directory."""
    t0 = time.perf_counter()
    trainer.fit()
    return {"train_minutes": (time.perf_counter() - t0) / 60, "steps": trainer.step, "run_dir": str(run_dir)}


def finished_results(trainer, run_dir: Path) -> Optional[dict]:
    """After ``trainer.resume()``: the saved results of a run that had already finished (trained, evaluated and
    reported), after one line saying so; else None. A run that finished training but never wrote its results
    (stopped in between) has its final weights evaluated again, recording nothing, so that the task can write them."""
    if not trainer.finished:
        return None
    saved = Path(run_dir) / "results.json"
    if saved.is_file():
        log.warning(f"{run_dir} already finished: {trainer.step} of {trainer.total_steps} steps, results in {saved}; "
                    "nothing to do (raise train.max_steps or train.epochs to train longer)")
        return json.loads(saved.read_text())
    if trainer.evaluate is not None:
        trainer.rerun_evaluation()
    return None


def resume_run(trainer, run_dir: Path, resume: bool) -> Optional[dict]:
    """With ``resume``, restore ``trainer`` from the run's last checkpoint and return ``finished_results`` (the saved
    results when the run had already finished, else None); without, None. A task returns what is not None."""
    if not resume:
        return None
    trainer.resume()
    return finished_results(trainer, run_dir)


def resolve_best_metric(cfg, choices: tuple[str, ...], default: str) -> None:
    """Set ``train.best_metric`` when it is unset: ``default``, or ``ema_<default>`` when the run keeps a weight EMA.
    A metric outside ``choices`` (all higher-is-better), or an ``ema_`` one without an EMA, is a one-line error."""
    train = cfg["train"]
    if train["best_metric"] is None:
        train["best_metric"] = f"ema_{default}" if train["ema_decay"] > 0 else default
    metric = train["best_metric"]
    if metric not in choices:
        raise ValueError(f"train.best_metric must be one of {', '.join(choices)} (higher is better), got {metric!r}")
    if metric.startswith("ema_") and not train["ema_decay"] > 0:
        raise ValueError(f"train.best_metric={metric} needs a weight EMA; set train.ema_decay (e.g. 0.9999) or "
                         f"train.best_metric={default}")


def build_backbone(model_cfg, families: tuple[str, ...], **extra):
    """A registered preset of one of ``families`` (the ones the task trains) with overrides, or (``model.init``) an
    existing checkpoint of one of them."""
    args = {**dict(model_cfg.args or {}), **extra}
    if model_cfg.init:
        from ..checkpoints import load_model
        model = load_model(model_cfg.init, family=families, **args)
        model.train()
        log.info(f"model initialised from {model_cfg.init}")
    else:
        model = create_model(check_preset(model_cfg.name, families), **args)
    if model_cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    n = sum(p.numel() for p in model.parameters())
    log.info(f"model {model_cfg.name}: {n / 1e6:.2f}M parameters")
    return model
