"""The Trainer contract: what an objective exposes to ``arvision.train.Trainer``.

An objective is an ``nn.Module`` that owns the model being trained and turns a batch into a loss:

    class MyObjective(Objective):
        def __init__(self, model):
            super().__init__()
            self.model = model                       # the registered-family model that checkpoints save

        def forward(self, inputs, targets):          # one (inputs, targets) pair from the loader
            loss = ...
            return loss, {"acc": acc}                # metrics: scalar tensors, no .item() (no host sync)

    trainer = Trainer(MyObjective(model), train_set, cfg.train, run_dir, env)

- ``model``: saved by ``arvision.checkpoints.save_model`` (loadable with ``load_model``). Everything else in the
  objective's ``state_dict`` (an EMA target, a loss's own parameters) is saved next to it in ``state.pt``.
- ``shard_units()``: the sub-modules FSDP2 shards one by one before the root (default: ``model.shard_units()``,
  which every registered family defines: each transformer block, a tokenizer's resolution stages).
- ``param_groups(lr, weight_decay, warmup_steps)``: AdamW groups (keys ``params``, ``weight_decay``, ``lr_base``,
  ``lr_scale``, ``warmup_steps``, optional ``names``) holding every trainable parameter of the objective exactly
  once (the Trainer checks). Default: weight decay on matrices, none on biases / norms / LayerScale.
- ``after_step()``: called after every optimizer step (e.g. to update an EMA target); default does nothing.
"""
from __future__ import annotations

from torch import nn

from .param_groups import weight_decay_groups


class Objective(nn.Module):
    """Base class of training objectives (see the module docstring). Subclasses set ``self.model``."""

    model: nn.Module

    def shard_units(self) -> list[nn.Module]:
        named = getattr(self.model, "shard_units", None)
        if callable(named):
            return list(named())
        blocks = getattr(self.model, "blocks", None)
        return list(blocks) if blocks is not None else []

    def param_groups(self, lr: float, weight_decay: float, warmup_steps: int) -> list[dict]:
        return weight_decay_groups(self, lr, weight_decay, warmup_steps)

    def after_step(self) -> None:
        pass

    def model_prefix(self) -> str:
        """The state-dict prefix of ``self.model`` inside this objective ('model.' when it is ``self.model``),
        found from the module tree."""
        for name, module in self.named_modules():
            if module is self.model:
                return f"{name}." if name else ""
        raise ValueError(f"{type(self).__name__}.model is not a sub-module of the objective; assign it as an "
                         "attribute (self.model = model) in __init__")


def check_param_groups(objective: nn.Module, groups: list) -> None:
    """One-line ValueError unless ``groups`` hold every trainable parameter of ``objective`` exactly once."""
    names = {id(p): n for n, p in objective.named_parameters()}
    trainable = {id(p) for p in objective.parameters() if p.requires_grad}
    seen: dict[int, int] = {}
    for g in groups:
        for p in g["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    twice = [names.get(i, "?") for i, c in seen.items() if c > 1]
    missing = [names[i] for i in trainable if i not in seen]
    foreign = [names.get(i, "<not in the objective>") for i in seen if i not in trainable]
    show = lambda bad: ", ".join(sorted(bad)[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    problem = (f"lists {show(twice)} more than once" if twice else
               f"leaves out the trainable parameters {show(missing)}" if missing else
               f"lists {show(foreign)}, which are frozen or not parameters of the objective" if foreign else None)
    if problem:
        raise ValueError(f"{type(objective).__name__}.param_groups() {problem}; it must list every trainable "
                         "parameter of the objective exactly once")
