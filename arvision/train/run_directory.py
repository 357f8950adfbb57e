"""The run directory appears when training starts, not when a task begins: a task checks its inputs (data, model,
config, ``--resume``) and builds the Trainer first, so a command that fails on them leaves nothing behind.

    defer_run_directory(run_dir, on_create=lambda d: save_config(cfg, d / "config.yaml"))   # prepare_run
    create_run_directory(run_dir)    # Trainer.fit: mkdir, then config.yaml, run.json (command, git commit) and
                                     # log.txt (with the lines logged so far)
"""
from __future__ import annotations

import os
import shlex
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


RUN_INFO = "run.json"


def source_commit(path=None) -> dict:
    """The git commit of the arvision source a run used (``git_commit``, and ``git_dirty`` when tracked files differ
    from it), or ``{"git_commit": None}`` outside a git checkout (an installed wheel) or without git."""
    import subprocess

    where = str(Path(path) if path is not None else Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {"git_commit": None}
        status = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def record_run(run_dir, task: str) -> Path:
    """Write RUN/run.json: the command line, the git commit of arvision's source, versions and the start time. A
    resumed run keeps the first record and appends its own under ``resumes``."""
    import json
    import platform
    import sys
    import time

    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        arvision_version = version("arvision")
    except PackageNotFoundError:
        arvision_version = None
    # the command line as the CLI received it (ARVISION_COMMAND, set by arvision.cli.main), else this process's argv
    command = os.environ.get("ARVISION_COMMAND") or shlex.join(sys.argv)
    entry = {"task": task, "command": command, **source_commit(), "arvision": arvision_version,
             "torch": torch.__version__,
             "python": platform.python_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = Path(run_dir) / RUN_INFO
    if path.is_file():
        try:
            info = json.loads(path.read_text())
        except ValueError:  # a damaged record: start again rather than fail the run
            info = {}
        info.setdefault("resumes", []).append(entry) if info else info.update(entry)
    else:
        info = entry
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)
    return path
