"""Training checkpoints: ``<run>/checkpoints/step_XXXXXXXX/`` holds the model in the arvision format
(model.safetensors + arvision.json, loadable by ``arvision.load_model``), the weight EMA (ema.safetensors)
and ``state.pt`` (optimizer, step, epoch, RNG, objective extras), loaded with ``weights_only=True``.

A checkpoint is written into a temporary directory and renamed into place only when complete, so an
interrupted write never leaves a half checkpoint behind; only the last ``keep_last`` are kept."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..files import FileFormatError, read_torch_file

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, state: dict, ema_state_dict: Optional[dict] = None,
                    keep_last: int = 2, preset: Optional[str] = None, model_state_dict: Optional[dict] = None) -> Path:
    from ..checkpoints import save_model

    final = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    final.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, final, ema_state_dict=ema_state_dict, preset=preset, state_dict=model_state_dict,
               extra_files=lambda tmp: torch.save(state, tmp / "state.pt"))
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(ckpt_dir: Path) -> dict:
    try:
        return read_torch_file(Path(ckpt_dir) / "state.pt")
    except FileFormatError as e:
        raise FileFormatError(f"{e}; or delete {ckpt_dir} to resume from the checkpoint before it") from None
