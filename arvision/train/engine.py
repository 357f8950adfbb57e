"""The training loop, written once and used by every task.

The Trainer contract (``arvision.objectives.base.Objective``): a task hands the Trainer an *objective*, an
``nn.Module`` that owns the model and turns a batch into a loss. The Trainer knows nothing of NEPA,
classification or any model family; it reads only these names:

- ``objective(inputs, targets) -> (loss, metrics)``: the loader yields ``(inputs, targets)`` pairs; targets may be
  class labels, segmentation masks or any tensor (or tuple / dict of tensors); metrics are scalar tensors.
- ``objective.model``: the registered-family model, saved with ``arvision.checkpoints.save_model`` (each
  checkpoint is loadable by ``load_model``). The rest of the objective's state (parameters and buffers outside
  ``objective.model``, found from the module tree) is saved in ``state.pt``; ``resume`` restores both.
- ``objective.shard_units()``: the modules FSDP2 shards before the root (used only with train.distributed=fsdp).
- ``objective.param_groups(lr, weight_decay, warmup_steps)``: AdamW groups covering every trainable parameter of
  the objective exactly once (checked; a one-line ValueError otherwise).
- ``objective.after_step()``: called after every optimizer step.

It owns batching (gradient accumulation, DDP / FSDP2), bf16 autocast, AdamW with per-group schedules, clipping,
the weight EMA of ``objective.model``, logging, atomic checkpoints, exact resume and a clean stop on SIGTERM.

No step synchronises the host with the device: the loss, the metrics and the gradient norm are summed on the device
and read (one all-reduce, one copy) every ``train.log_every`` steps, and a non-finite loss is caught there. Under
FSDP2 the gradients are reduce-scattered only on the last micro-batch of an accumulation and the gradient norm takes
one all-reduce; ``train.fsdp_mixed_precision`` (with bf16 precision) all-gathers parameters in bf16 and reduces
gradients in fp32. The ranks agree on a SIGTERM stop through one CPU integer all-reduce every
``train.stop_check_every`` steps (default 1: the stop happens at the first step boundary after the signal).

    trainer = Trainer(NepaObjective(model), train_set, cfg.train, run_dir, env, num_workers=2)
    trainer.resume()   # optional: continue from the latest checkpoint under run_dir
    trainer.fit()
"""
from __future__ import annotations

import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.workers import ignore_stop_signals
from ..files import read_safetensors
from ..objectives.base import Objective, check_param_groups
from .config import TrainConfig
from .checkpoint import latest_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state
from .distributed import (DistEnv, all_reduce_mean, any_rank, barrier, clip_grad_norm, control_group, full_copy,
                          full_model_state, full_states, gathered, wrap_model)
from .ema import build_ema
from .logging import MetricWriter, log, plot_loss_curve
from .run_directory import create_run_directory
from .optim import build_adamw, set_lr
from .sampler import ResumableSampler, SeededDataset

EvaluateFn = Callable[[nn.Module, Optional[nn.Module]], dict]  # scalars, and images as uint8 (H, W, 3) arrays


def is_image(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3 and value.shape[-1] == 3


class Trainer:
    def __init__(self, objective: Objective, train_set: Dataset, cfg: TrainConfig | Mapping, run_dir: Path,
                 env: DistEnv, *, num_workers: int = 2, evaluate: Optional[EvaluateFn] = None,
                 preset: Optional[str] = None):
        if not isinstance(objective, Objective):
            raise TypeError(f"the Trainer needs an arvision.objectives.Objective, got {type(objective).__name__}; "
                            "subclass Objective and set self.model")
        if not isinstance(cfg, TrainConfig):  # a task's cfg.train: the keys it leaves out take TrainConfig's defaults
            cfg = TrainConfig.from_dict(dict(cfg))
        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        self.objective = objective.to(env.device)
        self.model_prefix = objective.model_prefix()
        self.evaluate, self.preset, self.train_set = evaluate, preset, train_set
        world = env.world_size
        self.micro = cfg.micro_batch_size or cfg.batch_size // world
        self.sampler = ResumableSampler(len(train_set), cfg.batch_size, self.micro, env.rank, world, cfg.seed)
        self.accum = self.sampler.accum
        self.loader = DataLoader(SeededDataset(train_set), batch_size=self.micro, sampler=self.sampler,
                                 num_workers=num_workers, pin_memory=env.device.type == "cuda",
                                 persistent_workers=num_workers > 0, drop_last=True,
                                 worker_init_fn=ignore_stop_signals,  # a SIGTERM to the process group is ours
                                 # its own generator: creating an iterator must not draw from the global RNG
                                 generator=torch.Generator().manual_seed(cfg.seed))
        spe = self.sampler.steps_per_epoch
        self.total_steps = cfg.max_steps or cfg.epochs * spe
        self.epochs = math.ceil(self.total_steps / spe)
        self.lr = cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size / 256
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * self.total_steps)
        self.sharded = env.enabled and cfg.distributed == "fsdp"
        # Wrap before building the optimizer: FSDP2 turns the parameters into sharded DTensors in place.
        self.model = wrap_model(self.objective, env, cfg.distributed,
                                shard_units=objective.shard_units() if self.sharded else None,
                                mixed_precision=cfg.precision == "bf16" and cfg.fsdp_mixed_precision)
        groups = objective.param_groups(self.lr, cfg.weight_decay, self.warmup)
        check_param_groups(objective, groups)
        self.optimizer = build_adamw(groups, cfg.betas, cfg.eps, env.device.type)
        # under FSDP2 a sharded EMA: DTensors with the sharding of the parameters they average
        self.ema = (build_ema(objective.model, cfg.ema_decay, self.sharded, cfg.ema_warmup_power)
                    if cfg.ema_decay > 0 else None)
        self.autocast = dict(device_type=env.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        self.step, self.best = 0, None
        self.evaluated_step: Optional[int] = None  # the last step whose due evaluation has run
        self._window = None  # a logging window restored by resume(): (metric sums, steps, images, seconds)
        self._saved = None  # (step, evaluated_step) of the last checkpoint written or resumed
        torch.manual_seed(cfg.seed + env.rank)  # distinct drop-path / RoPE draws on each rank
        # train.logger: tensorboard | wandb | none (metrics.jsonl always); checked here, before the run directory exists
        self.writer = MetricWriter(self.run_dir, enabled=env.is_main, logger=cfg.logger)
        self._stop = False
        self._control = control_group() if env.enabled else None  # the ranks agree on stopping through it

    # ------------------------------------------------------------ state
    def _split(self, objective_sd: dict) -> tuple[dict, dict]:
        """(state of objective.model without its prefix, the rest of the objective's state)."""
        p = self.model_prefix
        model_sd = {k[len(p):]: v for k, v in objective_sd.items() if k.startswith(p)}
        return model_sd, {k: v for k, v in objective_sd.items() if not k.startswith(p)}

    def gathered(self):
        """Under FSDP, the root's own parameters gathered, so that ``objective.model`` and its methods can be called
        directly, on every rank at once (``distributed.gathered``). Nothing to do without FSDP."""
        return gathered(self.objective, self.sharded)

    def full_model(self, ema: bool = False) -> Optional[nn.Module]:
        """``objective.model`` as an ordinary, unsharded module on the main process (None on the others): the model
        itself, or under FSDP a copy built from the gathered full state (a collective: every rank calls it). With
        ``ema`` and a weight EMA kept (``train.ema_decay``), the module holding the EMA weights instead."""
        if ema and self.ema is not None:
            module = self.ema.module_for_eval()  # a collective under FSDP
            return module if self.env.is_main else None
        if not self.sharded:
            return self.objective.model if self.env.is_main else None
        state = full_model_state(self.objective.model, True)
        return full_copy(self.objective.model, state).to(self.env.device) if self.env.is_main else None

    def save(self, rng: dict, window: Optional[dict] = None) -> None:
        """Checkpoint the run after step ``self.step``: ``rng`` as that step left it, and ``window``, the metric sums of
        the logging window not written yet (a resumed run then writes the same rows as an uninterrupted one)."""
        model_sd, optim_sd = full_states(self.objective, self.optimizer, self.sharded)  # collective under FSDP
        per_rank = [{"rng": rng, "window": _window_to_cpu(window)}]
        if self.env.enabled:  # every rank's RNG and window, so that per-rank draws (drop path, RoPE) resume exactly
            per_rank = [None] * self.env.world_size
            torch.distributed.all_gather_object(per_rank, {"rng": rng, "window": _window_to_cpu(window)})
        ema = self.ema.state_dict() if self.ema is not None else None  # collective under FSDP
        if self.env.is_main:
            weights, extras = self._split(model_sd)
            state = {"step": self.step, "optimizer": optim_sd, "rng": [r["rng"] for r in per_rank],
                     "objective": extras, "best": self.best, "total_steps": self.total_steps,
                     # whether this step's evaluation (if one is due) has run: resume() runs it otherwise
                     "evaluated_step": self.evaluated_step,
                     "log_window": [r["window"] for r in per_rank],
                     # metrics.jsonl up to here: rows written after this checkpoint are dropped on resume
                     "metrics_bytes": self.writer.size()}
            path = save_checkpoint(self.run_dir, self.step, self.objective.model, state, ema, self.cfg.keep_last,
                                   self.preset, model_state_dict=weights)
            log.info(f"checkpoint: {path}")
        barrier()
        self._saved = (self.step, self.evaluated_step)

    def resume(self, ckpt: Optional[Path] = None) -> None:
        ckpt = ckpt or latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.run_dir}/checkpoints; start without --resume")
        state = load_state(ckpt)
        if state["total_steps"] != self.total_steps:
            log.info(f"the run was planned for {state['total_steps']} steps; it now trains to {self.total_steps} "
                     "(train.max_steps / train.epochs), the schedule follows the new length")
        # the optimizer's state (moments, step counts) comes from the checkpoint, its hyperparameters (lr, schedule
        # groups, weight decay, betas) from the current config, so that a changed value is applied on --resume
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        model_sd = {f"{self.model_prefix}{k}": v for k, v in read_safetensors(ckpt / "model.safetensors").items()}
        model_sd.update(state["objective"])
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.objective, model_sd, options=opts)
            set_optimizer_state_dict(self.objective, self.optimizer, state["optimizer"], options=opts)
        else:
            self.objective.load_state_dict(model_sd)
            self.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, hyper):
            group.update(values)
        if self.ema is not None:
            self.ema.load_state_dict(read_safetensors(ckpt / "ema.safetensors"))
        rngs = state["rng"]
        if len(rngs) != self.env.world_size:
            log.warning(f"resuming a {len(rngs)}-process run on {self.env.world_size} processes: random draws differ")
        set_rng_state(rngs[self.env.rank % len(rngs)])
        self.step, self.best = state["step"], state["best"]
        self.evaluated_step = state.get("evaluated_step")
        windows = state.get("log_window") or []
        self._window = windows[self.env.rank] if len(windows) == self.env.world_size else None
        self._saved = (self.step, self.evaluated_step)
        self.writer.rewind(state.get("metrics_bytes"), self.step)
        log.info(f"resumed from {ckpt} at step {self.step}")

    # ------------------------------------------------------------- loop
    def fit(self) -> dict:
        if self.finished:  # resumed after the last step and its evaluation: nothing left to do
            return {"step": self.step, "best": self.best}
        cfg, env = self.cfg, self.env
        if env.is_main:
            create_run_directory(self.run_dir)  # deferred by the task until its inputs were checked
        model = torch.compile(self.model) if cfg.compile else self.model
        ddp = isinstance(model, nn.parallel.DistributedDataParallel) or isinstance(
            getattr(model, "_orig_mod", None), nn.parallel.DistributedDataParallel)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        log.info(f"training {self.total_steps} steps ({self.epochs} epochs x {self.sampler.steps_per_epoch}), "
                 f"global batch {cfg.batch_size} = {self.micro} x {env.world_size} processes x {self.accum} "
                 f"accumulation, lr {self.lr:.3g}, warmup {self.warmup}")
        # Every rank handles SIGTERM (a scheduler may signal one process or all); they agree at a step boundary.
        # Ctrl-C (SIGINT) stops the same way; a second Ctrl-C interrupts at once.
        main_thread = threading.current_thread() is threading.main_thread()
        prev_handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)} \
            if main_thread else {}
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not env.is_main, dynamic_ncols=True,
                   desc="train", mininterval=1.0)
        sums, n_sum, t0, seen = None, 0, time.perf_counter(), 0
        if self._window is not None:  # resumed inside a logging window: its first steps are in the checkpoint
            restored, self._window = self._window, None
            sums = {k: v.to(env.device) for k, v in restored["sums"].items()}
            n_sum, seen, t0 = restored["steps"], restored["images"], t0 - restored["seconds"]

        def window() -> Optional[dict]:  # the logging window's sums not written yet, for a checkpoint
            return None if sums is None else dict(sums=sums, steps=n_sum, images=seen, seconds=time.perf_counter() - t0)
        step_at_start, rng_at_start = self.step, rng_state()
        try:
            if self.eval_pending:  # resumed from a checkpoint written before the evaluation due at its step
                self._evaluate()
                self._stop_if_requested(window())
            while self.step < self.total_steps:
                epoch, in_epoch = divmod(self.step, self.sampler.steps_per_epoch)
                self.sampler.set_epoch(epoch, in_epoch)
                batches = iter(self.loader)
                for _ in range(in_epoch, self.sampler.steps_per_epoch):
                    step_at_start, rng_at_start = self.step, rng_state()
                    lr = set_lr(self.optimizer, self.step, self.total_steps, cfg.min_lr, cfg.schedule, cfg.poly_power)
                    step_sums = self._accumulate(model, batches, ddp)
                    grad_norm = clip_grad_norm(params, cfg.clip_grad)  # one all-reduce under FSDP, no host sync
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    if self.ema is not None:
                        self.ema.update(self.objective.model, self.step)
                    self.objective.after_step()
                    step_sums["grad_norm"] = grad_norm.detach().float()
                    sums = step_sums if sums is None else {k: sums[k] + v for k, v in step_sums.items()}
                    n_sum += 1
                    seen += cfg.batch_size
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        elapsed = time.perf_counter() - t0
                        # one all-reduce and one device-to-host copy for all the metrics
                        means = all_reduce_mean(torch.stack([v.reshape(()) for v in sums.values()]) / n_sum).tolist()
                        row = dict(zip(sums, means))
                        row.update(lr=lr, epoch=self.step / self.sampler.steps_per_epoch, img_per_s=seen / elapsed)
                        if not math.isfinite(row["loss"]):
                            raise FloatingPointError(f"loss is {row['loss']} at step {self.step}; lower train.lr/blr "
                                                     f"or use train.precision=fp32, and resume from the last checkpoint")
                        self.writer.write(self.step, row)
                        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
                        sums, n_sum, t0, seen = None, 0, time.perf_counter(), 0
                    if self.step % cfg.stop_check_every == 0:
                        self._stop_if_requested(window())  # before an evaluation: a pre-emption leaves no time
                    if self.step % self.sampler.steps_per_epoch == 0 or self.step >= self.total_steps:
                        skipped = getattr(self.train_set, "num_skipped", 0)
                        if skipped:
                            log.warning(f"{skipped} unreadable images skipped so far (named in the warnings above)")
                            self.writer.write(self.step, {"skipped_images": skipped}, prefix="data")
                    if self._eval_due(self.step):
                        self._evaluate()
                        self._stop_if_requested(window())  # a stop asked for during the evaluation
                    # after this step's evaluation, so that a resumed run neither repeats nor skips it
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < self.total_steps:
                        self.save(rng_state(), window())
                    if self.step >= self.total_steps:
                        break
        except KeyboardInterrupt:
            log.warning(f"interrupted; saving the last completed step {self.step}")
            # RNG as it was when step `self.step` began: captured at the step start, or now if it just finished.
            self.save(rng_at_start if self.step == step_at_start else rng_state())
            raise KeyboardInterrupt(f"interrupted at step {self.step}; resume with --resume") from None
        finally:
            bar.close()
            for s, prev in prev_handlers.items():
                signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        if (self.step, self.evaluated_step) != self._saved:  # not when a resumed run only had nothing left to do
            self.save(rng_state())
        if env.is_main:
            plot_loss_curve(self.writer.path, self.run_dir / "loss_curve.png")
        self.writer.close()
        return {"step": self.step, "best": self.best}

    def _accumulate(self, model: nn.Module, batches, ddp: bool) -> dict:
        sums = {}
        for a in range(self.accum):
            inputs, targets = next(batches)
            inputs, targets = to_device(inputs, self.env.device), to_device(targets, self.env.device)
            sync = a == self.accum - 1
            if self.sharded and self.accum > 1:  # FSDP2: reduce-scatter once, on the last micro-batch
                self.model.set_requires_gradient_sync(sync)
            with (model.no_sync() if ddp and not sync else nullcontext()):
                with torch.autocast(**self.autocast):
                    loss, metrics = model(inputs, targets)
                (loss / self.accum).backward()
            for k, v in {"loss": loss, **metrics}.items():
                v = v.detach().float() / self.accum
                sums[k] = sums[k] + v if k in sums else v
        return sums

    def _eval_due(self, step: int) -> bool:
        """Whether an evaluation follows ``step``: every ``train.eval_every`` epochs and after the last step."""
        if self.evaluate is None or step <= 0:
            return False
        spe, every = self.sampler.steps_per_epoch, self.cfg.eval_every
        return step >= self.total_steps or bool(every and step % spe == 0 and (step // spe) % every == 0)

    @property
    def eval_pending(self) -> bool:
        """An evaluation is due at the current step and has not run (a checkpoint written before it)."""
        return self._eval_due(self.step) and self.evaluated_step != self.step

    @property
    def finished(self) -> bool:
        """Trained to the last step and, where one is due, evaluated there."""
        return self.step >= self.total_steps and not self.eval_pending

    def _stop_if_requested(self, window: Optional[dict]) -> None:
        if any_rank(self._stop, self._control):
            self.save(rng_state(), window)  # collectives: every rank is here, at the same step
            raise SystemExit(f"stopped at step {self.step}; resume with --resume")

    def _run_evaluate(self) -> dict:
        """``evaluate`` on every rank (each evaluates its shard of the data) with a random stream of its own: seeded
        from train.seed, so the same weights give the same results, and the training streams (torch, CUDA, NumPy,
        Python) are restored after it, so a run resumed around an evaluation trains as one that was not."""
        cuda = [self.env.device] if self.env.device.type == "cuda" else []
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=cuda), self.gathered():
            torch.manual_seed(self.cfg.seed)
            random.seed(self.cfg.seed)
            np.random.seed(self.cfg.seed % 2**32)
            try:
                return self.evaluate(self.objective.model,
                                     self.ema.module_for_eval() if self.ema is not None else None)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def rerun_evaluation(self) -> dict:
        """The evaluation of the current weights again, recording nothing (no metrics row, no best): for a task that
        rebuilds the results of a finished run whose results file was never written."""
        return self._run_evaluate()

    def _evaluate(self) -> None:
        results = self._run_evaluate()
        self.evaluated_step = self.step
        images = {k: v for k, v in results.items() if is_image(v)}
        results = {k: v for k, v in results.items() if k not in images}
        self.writer.write_images(self.step, images)
        if not results:
            return
        self.writer.write(self.step, results, prefix="eval")
        log.info(f"eval at step {self.step}: " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
        metric = self.cfg.best_metric
        if metric and metric in results and (self.best is None or results[metric] > self.best["value"]):
            self.best = {**results, "metric": metric, "value": results[metric], "step": self.step}
            weights = full_model_state(self.objective.model, self.sharded)  # collective under FSDP
            ema = self.ema.state_dict() if self.ema is not None else None  # collective under FSDP
            if self.env.is_main:
                from ..checkpoints import save_model
                save_model(self.objective.model, self.run_dir / "best", preset=self.preset, state_dict=weights,
                           ema_state_dict=ema)
            barrier()

    def _request_stop(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._stop:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now (the handler above saves the last completed step)
        log.warning(f"{signal.Signals(signum).name}: saving a checkpoint after this step"
                    + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""))
        self._stop = True


def _window_to_cpu(window: Optional[dict]) -> Optional[dict]:
    if window is None:
        return None
    return {**window, "sums": {k: v.detach().cpu() for k, v in window["sums"].items()}}


def to_device(batch, device: torch.device):
    """A tensor, or a tuple / list / dict of them, moved to ``device`` (other leaves pass through)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
