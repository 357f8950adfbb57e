"""The run directory appears when training starts, not when a task begins: a task checks its inputs (data, model,
config, ``--resume``) and builds the Trainer first, so a command that fails on them leaves nothing behind.

    defer_run_directory(run_dir, on_create=lambda d: save_config(cfg, d / "config.yaml"))   # prepare_run
    create_run_directory(run_dir)    # Trainer.fit: mkdir, then config.yaml and log.txt (with the lines logged so far)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

_pending: dict[Path, Callable[[Path], None]] = {}


def _key(run_dir) -> Path:
    return Path(run_dir).absolute()


def defer_run_directory(run_dir, on_create: Callable[[Path], None]) -> None:
    """Create ``run_dir`` (and run ``on_create(run_dir)``) only at ``create_run_directory``."""
    _pending[_key(run_dir)] = on_create


def create_run_directory(run_dir) -> Path:
    """Make ``run_dir`` and write what was deferred for it (nothing else for a directory that was not deferred)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    on_create = _pending.pop(_key(run_dir), None)
    if on_create is not None:
        on_create(run_dir)
    return run_dir
