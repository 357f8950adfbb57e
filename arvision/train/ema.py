"""The weight EMA of ``objective.model`` kept by the Trainer, for ordinary and FSDP2-sharded models.

    ema = build_ema(model, decay=0.9999, sharded=trainer.sharded)
    ema.update(model, step)                # after every optimizer step: ema <- decay * ema + (1 - decay) * model
    sd = ema.state_dict()                  # full tensors (a collective under FSDP2; the main process keeps them)
    ema.load_state_dict(sd)                # from full tensors (each process keeps its shard under FSDP2)
    module = ema.module_for_eval()         # an ordinary module holding the EMA weights (a collective under FSDP2)

Unsharded, it is timm's ``ModelEmaV3`` (a deep copy of the model; every float entry of the state dict is averaged,
the others copied). Under FSDP2 the model's parameters are sharded DTensors, so the EMA is too: one tensor per
state-dict entry with the same device mesh and placements as its parameter, updated by a local foreach lerp of the
shards (no communication, 1 / world_size of the model's memory per process). Checkpoints hold it as the unsharded
case does, full tensors in ``ema.safetensors``, gathered one tensor at a time as the model's own state is.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def build_ema(model: nn.Module, decay: float, sharded: bool, warmup_power: float = 0.0):
    if not 0 < decay < 1:
        raise ValueError(f"train.ema_decay must be in (0, 1) (or 0 for no EMA), got {decay}")
    if warmup_power < 0:
        raise ValueError(f"train.ema_warmup_power must be >= 0 (0: no warm-up), got {warmup_power}")
    return (ShardedEma if sharded else ReplicatedEma)(model, decay, warmup_power)


def decay_at(step: int, decay: float, warmup_power: float = 0.0) -> float:
    """The EMA decay of the update after optimizer step ``step`` (1, 2, ...): ``decay``, or with a warm-up (timm
    ModelEmaV3's ``use_warmup`` with gamma 1): 0 at step 1 (the first update copies the weights), then
    min(decay, 1 - step^-power), so the average forgets its start, where a fixed decay keeps decay^t of the random
    initialisation after t steps (13.5% after 2,000 steps at 0.999)."""
    if warmup_power <= 0:
        return decay
    if step <= 1:
        return 0.0
    return min(decay, 1.0 - float(step) ** -warmup_power)


class ReplicatedEma:
    """timm's ModelEmaV3 of an unsharded model, behind the interface of ``ShardedEma``."""

    def __init__(self, model: nn.Module, decay: float, warmup_power: float = 0.0):
        from timm.utils import ModelEmaV3

        self.warmup_power = warmup_power
        self._ema = ModelEmaV3(model, decay=decay, use_warmup=warmup_power > 0,
                               warmup_power=warmup_power if warmup_power > 0 else 2 / 3)

    @property
    def module(self) -> nn.Module:
        return self._ema.module

    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """``step``: optimizer steps taken so far (read only with a warm-up; timm's ``get_decay``, = ``decay_at``)."""
        self._ema.update(model, step=step if self.warmup_power > 0 else None)

    def state_dict(self) -> dict:
        return self._ema.module.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._ema.module.load_state_dict(state_dict)

    def module_for_eval(self) -> nn.Module:
        return self._ema.module


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class ShardedEma:
    """EMA of an FSDP2-sharded model: a DTensor per parameter with its parameter's sharding (see the module doc).
    Buffers (not sharded by FSDP2) are kept whole, as the model keeps them."""

    def __init__(self, model: nn.Module, decay: float, warmup_power: float = 0.0):
        self.decay, self.warmup_power, self.model = decay, warmup_power, model
        with torch.no_grad():
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        decay = decay_at(step, self.decay, self.warmup_power) if step is not None else self.decay
        ema_float, model_float = [], []
        for k, v in model.state_dict().items():
            e = self.state[k]
            if e.is_floating_point():
                ema_float.append(_local(e))
                model_float.append(_local(v.detach()).to(e.dtype))
            else:
                _local(e).copy_(_local(v))
        if ema_float:
            torch._foreach_lerp_(ema_float, model_float, 1.0 - decay)

    def state_dict(self) -> dict:
        """Full CPU tensors on the main process (an empty dict elsewhere); a collective: every process calls it."""
        main = not dist.is_initialized() or dist.get_rank() == 0
        out = {}
        for k, v in self.state.items():
            full = v.full_tensor() if hasattr(v, "full_tensor") else v
            if main:
                out[k] = full.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """From full tensors (every process reads the file, as the model's resume does); keeps this process's shard."""
        from torch.distributed.tensor import distribute_tensor

        missing, unexpected = self.state.keys() - state_dict.keys(), state_dict.keys() - self.state.keys()
        if missing or unexpected:
            raise ValueError(f"the EMA weights do not match the model: missing {sorted(missing)[:4]}, unexpected "
                             f"{sorted(unexpected)[:4]}; resume with the config that wrote the checkpoint")
        for k, e in self.state.items():
            full = state_dict[k].to(device=_local(e).device, dtype=e.dtype)
            if hasattr(e, "device_mesh"):
                full = distribute_tensor(full, e.device_mesh, e.placements, src_data_rank=None)
            _local(e).copy_(_local(full))

    def module_for_eval(self, device: Optional[torch.device] = None) -> nn.Module:
        """An ordinary module of the model's family holding the full EMA weights, on every process (a collective):
        evaluation runs it as each process's shard of the data needs."""
        from ..models import build_from_config, family_of

        copy = build_from_config(family_of(self.model), self.model.config.to_dict())
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in self.state.items()}
        copy.load_state_dict(full)
        device = device or next(iter(_local(v) for v in self.state.values())).device
        return copy.to(device).eval()
