"""Shared set-up for task recipes: run directory, seeding, logging, model construction."""
from __future__ import annotations

import copy
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import save_config
from ..models import create_model
from ..train.checkpoint import latest_checkpoint
from ..train.distributed import DistEnv, init_distributed
from ..train.logging import log, open_log_file, setup_logging
from ..train.run_directory import defer_run_directory


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


PATH_KEYS = ("source", "init", "backbone_init", "judge", "reference")  # and every key ending in _path


def absolute_paths(cfg) -> None:
    """Make the config's relative file paths absolute (data.source, model.init, ..., *_path), so the saved config
    still finds them from any directory (``arvision sample`` reads the token cache of a run's config)."""
    from ..data import is_synthetic

    for key, value in list(cfg.items()):
        if isinstance(value, dict):
            absolute_paths(value)
        elif ((key in PATH_KEYS or str(key).endswith("_path")) and isinstance(value, str) and value
              and not is_synthetic(value) and not os.path.isabs(value) and os.path.exists(value)):
            cfg[key] = os.path.abspath(value)


def prepare_run(cfg, task: str, out: Optional[str], resume: bool) -> tuple[DistEnv, Path]:
    """Initialise distributed, pick and check the run directory, save the resolved config, set up logs."""
    absolute_paths(cfg)
    env = init_distributed()
    if out is None:
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        if env.enabled:
            dist.broadcast_object_list(stamp, src=0)
        out = f"runs/{task}-{stamp[0]}"
    run_dir = Path(out)
    if resume and latest_checkpoint(run_dir) is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}/checkpoints; start without --resume")
    if env.is_main:
        if latest_checkpoint(run_dir) is not None and not resume:
            raise FileExistsError(f"run directory {run_dir} already holds checkpoints; pass --resume to continue it "
                                  f"or choose another --out")
        # Nothing is written until training starts (Trainer.fit): a task that fails on its data, model or settings
        # before then leaves no run directory behind.
        resolved = copy.deepcopy(cfg)
        defer_run_directory(run_dir, lambda d: (save_config(resolved, d / "config.yaml"), open_log_file(d)))
    if env.enabled:
        dist.barrier()
    setup_logging(env.is_main, run_dir, hold_file=True)
    if env.device.type == "cuda":  # TF32 matmuls for any fp32 work left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return env, run_dir


def build_backbone(model_cfg, **extra):
    """A registered preset with overrides, or (``model.init``) an existing checkpoint."""
    args = {**dict(model_cfg.args or {}), **extra}
    if model_cfg.init:
        from ..checkpoints import load_model
        model = load_model(model_cfg.init, family="nepa_vit", **args)
        model.train()
        log.info(f"model initialised from {model_cfg.init}")
    else:
        model = create_model(model_cfg.name, **args)
    if model_cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    n = sum(p.numel() for p in model.parameters())
    log.info(f"model {model_cfg.name}: {n / 1e6:.2f}M parameters")
    return model
