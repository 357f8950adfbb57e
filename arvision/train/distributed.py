"""torch.distributed set-up for ``torchrun`` launches (single or multi node), DDP and FSDP2 wrapping.

    torchrun --nproc_per_node 8 -m arvision pretrain ...                       # one node
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m arvision pretrain ...
"""
from __future__ import annotations

import os
from dataclasses import dataclass

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


def wrap_model(module: nn.Module, env: DistEnv, strategy: str = "ddp", shard_units=None) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on each of ``shard_units``, e.g. the transformer blocks, then the root) for
    models that do not fit."""
    if not env.enabled:
        return module
    if strategy == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in shard_units or []:
            fully_shard(unit)
        fully_shard(module)
        return module
    raise ValueError(f"train.distributed must be 'ddp' or 'fsdp', got {strategy!r}")


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


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
