"""Experiment tracking (issue 20): train.logger=tensorboard|wandb|none, and what each run records about itself
(run.json: the command line, arvision's git commit; config.yaml: the resolved config)."""
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from arvision.cli import main

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = ["model.args={depth: 1}", "data.num_samples=32", "train.batch_size=16", "train.log_every=1",
            "train.ckpt_every=0", "eval.knn=false", "data.num_workers=0", "train.precision=fp32", "train.max_steps=2"]


def _head() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_run_records_command_commit_and_config_and_logger_none_writes_no_tensorboard(tmp_path):
    run = tmp_path / "run"
    main(["pretrain", "--out", str(run), *PRETRAIN, "train.logger=none"])
    info = json.loads((run / "run.json").read_text())
    assert info["command"].startswith(f"arvision pretrain --out {run} ") and "train.logger=none" in info["command"]
    assert info["task"] == "pretrain" and info["torch"] and info["started"]
    if _head():  # a git checkout: the commit of the code that ran
        assert info["git_commit"] == _head() and isinstance(info["git_dirty"], bool)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["logger"] == "none"
    assert (run / "metrics.jsonl").is_file() and not (run / "tb").exists()
    main(["pretrain", "--out", str(run), "--resume", "train.max_steps=3"])
    info = json.loads((run / "run.json").read_text())
    assert len(info["resumes"]) == 1 and "--resume" in info["resumes"][0]["command"]
    assert "train.logger=none" in info["command"]  # the first record is kept


def test_default_logger_is_tensorboard_and_unknown_logger_is_one_line(tmp_path, capsys):
    main(["pretrain", "--out", str(tmp_path / "tb_run"), *PRETRAIN])
    assert list((tmp_path / "tb_run" / "tb").glob("events.out.tfevents.*"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["pretrain", "--out", str(tmp_path / "bad"), *PRETRAIN, "train.logger=mlflow"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "arvision: error: train.logger must be one of tensorboard, wandb, none, got 'mlflow'"
    assert not (tmp_path / "bad").exists()


def test_wandb_logger_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    main(["pretrain", "--out", str(run), *PRETRAIN, "train.logger=wandb"])
    run_id = (run / "wandb_id").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1
    log_file = next(offline[0].glob("*.wandb"))  # the offline run log (`wandb sync` uploads it)
    deadline = time.monotonic() + 30  # written by W&B's own service process, which may finish after finish() returns
    while b"train/loss" not in log_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    record = log_file.read_bytes()
    assert b"train/loss" in record and b"logger" in record  # the metrics and the resolved config
    assert not (run / "tb").exists()
