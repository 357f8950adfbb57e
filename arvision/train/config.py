"""``TrainConfig``: every key of a task's ``train:`` block, with its one default.

A task's default YAML (arvision/configs/<task>.yaml) holds only the train keys whose value differs from these;
``arvision.config.load_config`` fills in the rest, so ``--print-config`` and the run's saved config.yaml list every key.
The Trainer takes a TrainConfig (or a mapping, read with ``TrainConfig.from_dict``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..typed_config import ConfigDict
from .optim import SCHEDULES

PRECISIONS = ("bf16", "fp32")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class TrainConfig(ConfigDict):
    epochs: int = 2                         # passes over the training set (max_steps overrides)
    max_steps: Optional[int] = None         # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 64                    # global batch per optimizer step
    micro_batch_size: Optional[int] = None  # per-process batch; accumulation fills the global batch
    blr: Optional[float] = 1.0e-3           # lr = blr * batch_size / 256
    lr: Optional[float] = None              # absolute lr, overrides blr
    min_lr: float = 0.0                     # the schedule ends here
    schedule: str = "cosine"                # after warmup: cosine (official NEPA) | constant (MAR) | poly (mmseg)
    poly_power: float = 1.0                 # poly schedule: (1 - t/T) ** poly_power
    warmup_ratio: float = 0.0               # of the total steps
    warmup_steps: Optional[int] = None      # overrides warmup_ratio
    weight_decay: float = 0.05              # AdamW, on the groups the objective marks (matrices by default)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW
    eps: float = 1.0e-8                     # AdamW
    clip_grad: Optional[float] = 1.0        # max gradient norm; null: no clipping
    precision: str = "bf16"                 # bf16 autocast (CUDA and CPU) | fp32
    compile: bool = False                   # torch.compile the training step
    ema_decay: float = 0.0                  # weight EMA (saved as ema.safetensors); 0: off
    ema_warmup_power: float = 0.0           # > 0: EMA warm-up (timm ModelEmaV3): decay min(ema_decay, 1 - t^-power)
                                            #   at step t (timm: 2/3 long runs, 3/4 short); 0: ema_decay throughout
    seed: int = 1337                        # data order, initialisation, augmentation draws
    distributed: str = "ddp"                # ddp | fsdp (FSDP2, shards each block)
    fsdp_mixed_precision: bool = False      # with fsdp and bf16: all-gather bf16 parameters, reduce fp32 gradients
    stop_check_every: int = 1               # steps between the ranks' SIGTERM agreement (one CPU all-reduce)
    log_every: int = 10                     # steps between metrics rows (and host reads of the loss)
    logger: str = "tensorboard"             # tracker beside metrics.jsonl: tensorboard (RUN/tb) | wandb | none
    ckpt_every: int = 1000                  # steps between checkpoints (0: only at the end)
    keep_last: int = 2                      # run checkpoints kept
    eval_every: int = 0                     # epochs between evaluations (0: only at the end)
    best_metric: Optional[str] = None       # the evaluation result that picks <run>/best (default: the task's)

    def __post_init__(self):
        for key, value, allowed in (("schedule", self.schedule, SCHEDULES), ("precision", self.precision, PRECISIONS),
                                    ("distributed", self.distributed, DISTRIBUTED)):
            if value not in allowed:
                raise ValueError(f"train.{key} must be one of {', '.join(allowed)}, got {value!r}")
        if self.lr is None and self.blr is None:
            raise ValueError("train.lr and train.blr are both null; set one (e.g. train.blr=1e-3)")
        if len(self.betas) != 2:
            raise ValueError(f"train.betas must be two numbers (e.g. [0.9, 0.95]), got {self.betas!r}")
        for key in ("batch_size", "log_every", "stop_check_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
