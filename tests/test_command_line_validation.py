"""Command lines are checked before anything is created, and say in one line what is wrong and what is valid
(issue 15, item 7)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import arvision
from arvision.cli import main
from arvision.data.token_cache import build_token_cache

REPO = Path(__file__).resolve().parents[1]
TRAIN_COMMANDS = [["pretrain"], ["finetune"], ["tokenizer", "train"], ["segment", "train"], ["heptapod", "train"]]


def one_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    stderr = capsys.readouterr().err.strip()
    assert e.value.code not in (0, None), stderr
    err = stderr.splitlines()[-1]
    assert err.startswith("arvision: error:") and "Traceback" not in stderr, stderr
    return err


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("clv")
    torch.manual_seed(0)
    tok = arvision.create_model("vq_f4_32px").eval()
    build_token_cache(tok, "synthetic", root / "cache", img_size=32, limit=24, num_workers=0, progress=False)
    return root / "cache"


@pytest.mark.parametrize("command", TRAIN_COMMANDS, ids=lambda c: " ".join(c))
def test_resume_without_a_checkpoint_creates_nothing(command, tmp_path, capsys, request):
    out = tmp_path / "new_run"
    extra = ["--data", str(request.getfixturevalue("cache")), "train.batch_size=8"] if command[0] == "heptapod" else []
    err = one_line([*command, "--out", str(out), "--resume", *extra], capsys)
    assert "no checkpoint" in err and not out.exists(), err


@pytest.mark.parametrize("command", TRAIN_COMMANDS, ids=lambda c: " ".join(c))
def test_data_without_a_train_split_creates_nothing(command, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "val" / "cat").mkdir(parents=True)
    out = tmp_path / "new_run"
    err = one_line([*command, "--data", str(data), "--out", str(out)], capsys)
    assert str(data) in err and not out.exists(), err
