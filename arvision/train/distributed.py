"""torch.distributed set-up for ``torchrun`` launches (single or multi node), DDP and FSDP2 wrapping.

    torchrun --nproc_per_node 8 -m arvision pretrain ...                       # one node
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m arvision pretrain ...
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Reads torchrun's environment; NCCL on GPUs, gloo on CPUs. A plain ``python`` launch is one process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistEnv(rank, world, local_rank, dev)


def join_process_group(timeout_hours: float = 48.0) -> tuple[int, int]:
    """(rank, world size) for jobs that only share work out (sampling shards, token-cache batches): under torchrun a
    gloo group, whatever the device, whose collectives wait up to ``timeout_hours`` (a process that finished its share
    waits at the end for the slowest one's last piece of work); a plain launch is (0, 1). An existing group is used
    as it is."""
    from datetime import timedelta

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=timeout_hours))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def has_state_buffers(module: nn.Module) -> bool:
    """True when ``module`` holds persistent buffers (running statistics, counters) that DDP must keep equal across
    ranks; non-persistent buffers (RoPE frequencies, masks) are constants computed identically on every rank."""
    return any(name not in m._non_persistent_buffers_set for m in module.modules()
               for name, b in m._buffers.items() if b is not None)


def wrap_model(module: nn.Module, env: DistEnv, strategy: str = "ddp", shard_units=None,
               mixed_precision: bool = False) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on each of ``shard_units``, e.g. the transformer blocks, then the root) for
    models that do not fit. DDP broadcasts buffers before each forward only when the module has persistent ones
    (``has_state_buffers``). ``mixed_precision`` (FSDP2 only): parameters all-gathered and used in bf16, gradients
    reduced in fp32 (``MixedPrecisionPolicy``)."""
    if not env.enabled:
        return module
    if strategy == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=has_state_buffers(module))
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
            else MixedPrecisionPolicy()
        if not shard_units:
            from .logging import log
            log.warning(f"FSDP2: {type(module).__name__} names no shard units, so the whole model is gathered at once "
                        "in every forward (no memory saved over DDP); define its model's shard_units()")
        for unit in shard_units or []:
            fully_shard(unit, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        return module
    raise ValueError(f"train.distributed must be 'ddp' or 'fsdp', got {strategy!r}")


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: Optional[float]) -> torch.Tensor:
    """Total 2-norm of the gradients of ``params``, clipped to ``max_norm`` (None or 0: no clipping, the norm only),
    as ``clip_grad_norm_`` but with one all-reduce for sharded (FSDP2 DTensor) gradients, a plain tensor result and
    no host synchronisation."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a DTensor (partial norms of the shards): the one all-reduce
        norm = norm.full_tensor()
    if max_norm and math.isfinite(max_norm):
        grads = [p.grad for p in params]
        if grads and hasattr(grads[0], "to_local"):  # scale the local shards: the norm is already global
            grads = [g.to_local() for g in grads]
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
    return norm


def control_group():
    """A gloo (CPU) process group for small control messages (the stop flag), so that agreeing on them never
    synchronises a GPU stream; the default group when it already is gloo, None without torch.distributed.
    A collective: every rank calls it, in the same order."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def any_rank(flag: bool, group) -> bool:
    """True on every rank when ``flag`` is True on any rank (an all-reduce of one CPU integer on ``group``)."""
    if group is None:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------ full states of an FSDP2-sharded objective
_FULL_ON_CPU = dict(full_state_dict=True, cpu_offload=True)


def full_states(objective: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """(objective state dict, optimizer state dict), gathered to full CPU tensors when the objective is sharded (a
    collective then: every rank calls it)."""
    if not sharded:
        return objective.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(**_FULL_ON_CPU)
    return get_model_state_dict(objective, options=opts), get_optimizer_state_dict(objective, optimizer, options=opts)


def full_model_state(model: nn.Module, sharded: bool) -> dict:
    """The full state of ``model`` (a collective when it is sharded: every rank calls it)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(**_FULL_ON_CPU))


@contextmanager
def gathered(objective: nn.Module, sharded: bool):
    """Under FSDP, the root's own parameters (those outside its shard units, e.g. embeddings and head) gathered, so
    that the model and its methods can be called directly, on every rank at once (the shard units gather themselves in
    their forward). Nothing to do without FSDP."""
    if not sharded:
        yield
        return
    objective.unshard()
    try:
        yield
    finally:
        objective.reshard()


def full_copy(model: nn.Module, state: dict) -> nn.Module:
    """An ordinary, unsharded copy of the registered-family ``model`` holding ``state`` (its full state dict)."""
    from ..models import build_from_config, family_of

    copy = build_from_config(family_of(model), model.config.to_dict())
    copy.load_state_dict(state)
    return copy.train(model.training)
