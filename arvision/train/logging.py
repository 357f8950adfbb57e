"""Run logging: metrics as JSONL, mirrored to an experiment tracker (``train.logger``: TensorBoard, Weights & Biases or
none), and the loss-curve PNG."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("arvision")


class _Held(logging.Handler):
    """The lines logged before the run directory exists, written to its log.txt when it is created."""

    def __init__(self, limit: int = 100_000):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.limit:
            self.records.append(record)


def _log_file(run_dir: Path) -> logging.Handler:
    fh = logging.FileHandler(Path(run_dir) / "log.txt")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    return fh


def setup_logging(is_main: bool, run_dir: Optional[Path] = None, hold_file: bool = False) -> None:
    """Log to the current stderr and (main process) RUN/log.txt; with ``hold_file`` the file lines are held until
    ``open_log_file`` (the run directory does not exist yet). Handlers set up by an earlier run in this process are
    replaced, so each run's log.txt holds its own lines; handlers a user installed are left alone."""
    if any(not getattr(h, "_arvision", False) for h in log.handlers):
        return
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handlers = [handler]
    if run_dir is not None and is_main:
        handlers.append(_Held() if hold_file else _log_file(run_dir))
    for h in handlers:
        h._arvision = True
        log.addHandler(h)
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    logging.getLogger("arvision.data").setLevel(logging.WARNING)


def is_main_process() -> bool:
    """Rank 0 of torch.distributed, or any process outside a process group."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def progress_bar(iterable=None, *, desc: str, total: Optional[int] = None, enabled: bool = True, unit: str = "it"):
    """A tqdm bar with the rate and an ETA on stderr, on the main process only (``enabled=False``: none). In a
    terminal it redraws in place and clears itself when done; into a file or a pipe it writes at most every 30 s and
    keeps its last state, so a log shows how far a long phase got without filling up."""
    from tqdm import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    terminal = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=not terminal,
                dynamic_ncols=True, mininterval=0.1 if terminal else 30.0, disable=not (enabled and is_main_process()))


def open_log_file(run_dir: Path) -> None:
    """Start RUN/log.txt with the lines held so far (``setup_logging(hold_file=True)``)."""
    for held in [h for h in log.handlers if isinstance(h, _Held)]:
        fh = _log_file(run_dir)
        fh._arvision = True
        for record in held.records:
            fh.handle(record)
        log.removeHandler(held)
        log.addHandler(fh)


LOGGERS = ("tensorboard", "wandb", "none")


def check_logger(name: str) -> str:
    """``train.logger`` checked before anything is written: a known name, and wandb importable when asked for."""
    if name not in LOGGERS:
        raise ValueError(f"train.logger must be one of {', '.join(LOGGERS)}, got {name!r}")
    if name == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ImportError("train.logger=wandb needs Weights & Biases: pip install wandb (WANDB_MODE=offline "
                              "logs without a network), or use train.logger=tensorboard") from None
    return name


class _WandbRun:
    """The Weights & Biases run of a run directory: its id is kept in RUN/wandb_id, so a resumed run continues the
    same W&B run; the resolved config.yaml is its config. WANDB_MODE=offline writes it under RUN/wandb/ only."""

    def __init__(self, run_dir: Path):
        import uuid

        import wandb
        import yaml

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n")
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "arvision"), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def add_image(self, tag: str, image, step: int) -> None:
        import wandb
        self.run.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricWriter:
    """Appends {"step": ..., **metrics} lines to metrics.jsonl and mirrors scalars to the tracker ``logger`` names:
    TensorBoard (RUN/tb), Weights & Biases (``wandb``) or none. The tracker is opened at the first write, so a run that
    writes nothing leaves no file.

    ``rewind(size, step)`` (on resume) drops what was written after the checkpoint: metrics.jsonl is cut back to the
    ``size`` it had then, and TensorBoard purges the events from ``step`` on (``SummaryWriter(purge_step=...)``), the
    rows of ``step`` itself that metrics.jsonl keeps being written to it again, so no step appears twice. W&B cannot
    delete logged points: a resumed W&B run continues the same run, and its steps already logged are not logged twice
    (W&B ignores steps below its last)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, logger: Optional[str] = None):
        self.logger = check_logger(logger if logger is not None else ("tensorboard" if tensorboard else "none"))
        self.enabled, self.tensorboard = enabled, self.logger != "none"
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb, self._purge_step = None, None

    def _tensorboard(self):
        if self.tb is None and self.enabled and self.logger == "wandb":
            self.tb = _WandbRun(self.path.parent)
            return self.tb
        if self.tb is None and self.enabled and self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.path.parent / "tb"), purge_step=self._purge_step)
            except ImportError:  # tensorboard is a dependency; tolerate a broken install
                log.warning("tensorboard is not importable; metrics go to metrics.jsonl only")
                self.tensorboard = False
            if self.tb is not None and self._purge_step is not None:
                for row in read_metrics(self.path, split=None):
                    if row["step"] >= self._purge_step:
                        self._add_scalars(row["step"], row, row["split"])
        return self.tb

    def _add_scalars(self, step: int, metrics: dict, prefix: str) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "split"):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tb = self._tensorboard()  # before the row is appended: opening it after a rewind replays the kept rows
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        if tb is not None:
            self._add_scalars(step, metrics, prefix)

    def write_images(self, step: int, images: dict, prefix: str = "eval") -> None:
        """uint8 (H, W, 3) arrays (sample or reconstruction grids) to the tracker as images ``prefix/name``; on
        resume, TensorBoard drops the images of the purged steps with the scalars."""
        tb = self._tensorboard() if self.enabled else None
        for name, image in images.items():
            if isinstance(tb, _WandbRun):
                tb.add_image(f"{prefix}/{name}", image, step)
            elif tb is not None:
                tb.add_image(f"{prefix}/{name}", image, step, dataformats="HWC")

    def size(self) -> int:
        """Bytes of metrics.jsonl written so far (0 on the processes that do not write)."""
        return self.path.stat().st_size if self.enabled and self.path.is_file() else 0

    def rewind(self, size: Optional[int], step: int) -> None:
        if not self.enabled:
            return
        if size is not None and self.path.is_file() and self.path.stat().st_size > size:
            with open(self.path, "r+b") as f:
                f.truncate(size)
        self.close()
        self._purge_step = step

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(path: Path, split: Optional[str] = "train") -> list[dict]:
    """The rows of ``split`` in a metrics.jsonl (every row with ``split=None``)."""
    if not Path(path).exists():
        return []
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


def plot_loss_curve(metrics_path: Path, out_png: Path, title: str = "training loss") -> Optional[Path]:
    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    # a line through one point draws nothing: markers show short runs (one or a few logged points)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2, marker="o" if len(rows) < 20 else None,
            markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
