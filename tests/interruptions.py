"""Interrupting a training run in tests: a SIGTERM to this process after a given optimizer step (a scheduler's
pre-emption: the Trainer saves and exits), or ``Killed``, an exception the Trainer does not catch, so that nothing is
saved (what SIGKILL leaves behind)."""
import os
import signal


class Killed(BaseException):
    pass


def _interrupt(how: str, step: int) -> None:
    if how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        raise Killed(f"killed after step {step}")


def interrupt_after_step(trainer, step: int, how: str = "sigterm") -> None:
    """Interrupt ``trainer`` right after its optimizer step ``step``."""
    original = trainer.objective.after_step

    def after_step():
        original()
        if trainer.step == step:
            _interrupt(how, step)
    trainer.objective.after_step = after_step


def stop_at(monkeypatch, objective_cls, step: int, how: str = "sigterm") -> None:
    """Interrupt any run of ``objective_cls`` after its ``step``-th optimizer step (for runs started through the
    command line, where the Trainer is not at hand)."""
    original, count = objective_cls.after_step, [0]

    def after_step(self):
        original(self)
        count[0] += 1
        if count[0] == step:
            _interrupt(how, step)
    monkeypatch.setattr(objective_cls, "after_step", after_step)
