"""Run logging: metrics as JSONL and TensorBoard, and the loss-curve PNG."""
from __future__ import annotations

import json
import logging
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


def open_log_file(run_dir: Path) -> None:
    """Start RUN/log.txt with the lines held so far (``setup_logging(hold_file=True)``)."""
    for held in [h for h in log.handlers if isinstance(h, _Held)]:
        fh = _log_file(run_dir)
        fh._arvision = True
        for record in held.records:
            fh.handle(record)
        log.removeHandler(held)
        log.addHandler(fh)


class MetricWriter:
    """Appends {"step": ..., **metrics} lines to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is a dependency; tolerate a broken install
                log.warning("tensorboard is not importable; metrics go to metrics.jsonl only")

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path, split: str = "train") -> list[dict]:
    if not Path(path).exists():
        return []
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == split]


def plot_loss_curve(metrics_path: Path, out_png: Path, title: str = "training loss") -> Optional[Path]:
    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
