"""Command lines are checked before anything is created, and say in one line what is wrong and what is valid
(issue 15, item 7)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import arvision
from arvision.cli import main

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
def cache(vq_token_cache):
    return vq_token_cache


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


@pytest.fixture(scope="module")
def generator_run(cache, tmp_path_factory):
    """A generator trained with a RELATIVE --data path, from its own working directory."""
    start = tmp_path_factory.mktemp("start")
    os.symlink(cache, start / "c10_vq")
    here = os.getcwd()
    os.chdir(start)
    try:
        main(["heptapod", "train", "--data", "c10_vq", "--out", "runs/gen", "train.max_steps=1", "train.batch_size=8",
              "sample.num_per_class=0", "model.args.depth=1", "model.args.head_depth=1",
              "objective.timesteps_per_image=2", "data.num_workers=0"])
    finally:
        os.chdir(here)
    return start / "runs" / "gen" / "checkpoints" / "step_00000001"


def test_sample_from_another_directory_finds_the_run_tokenizer(generator_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not where the run was started: "c10_vq" means nothing here
    main(["sample", str(generator_run), "--out", "s", "--num-per-class", "1", "--classes", "2"])
    assert (tmp_path / "s" / "samples.npz").is_file()


def test_sample_accepts_class_names_and_lists_the_valid_ones(generator_run, tmp_path, capsys):
    import numpy as np

    main(["sample", str(generator_run), "--out", str(tmp_path / "s"), "--num-per-class", "1",
          "--classes", "circle,star"])
    assert sorted(np.load(tmp_path / "s" / "samples.npz")["arr_1"].tolist()) == [0, 4]
    err = one_line(["sample", str(generator_run), "--out", str(tmp_path / "t"), "--classes", "cat"], capsys)
    assert "'cat'" in err and "circle" in err and "hexagon" in err and "0..9" in err, err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("flag, value", [("--num-per-class", "0"), ("--num-per-class", "-3"), ("--batch-size", "0")])
def test_sample_counts_must_be_positive(generator_run, tmp_path, capsys, flag, value):
    err = one_line(["sample", str(generator_run), "--out", str(tmp_path / "s"), flag, value], capsys)
    assert flag in err and value in err, err
    assert not (tmp_path / "s").exists()


def test_segment_predict_keeps_images_with_the_same_file_name_apart(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    seg = arvision.create_model("upernet_nepa_tiny_patch4_32", num_classes=3, channels=8, aux_channels=4,
                                backbone={"depth": 2, "embed_dim": 16, "num_heads": 1}, out_indices=[0, 0, 1, 1])
    ckpt = arvision.save_model(seg, tmp_path / "seg")
    rng = np.random.default_rng(0)
    images = []
    for cls in ("cat", "ship"):
        (tmp_path / cls).mkdir()
        images.append(tmp_path / cls / "0000.jpg")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images[-1])
    out = tmp_path / "pred"
    main(["segment", "predict", str(ckpt), "--images", *map(str, images), "--out", str(out)])
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 4 and len(set(written)) == 4, written
    assert any("cat" in n for n in written) and any("ship" in n for n in written), written
    err = one_line(["segment", "predict", str(ckpt), "--images", str(tmp_path / "dog" / "0000.jpg"),
                    "--out", str(tmp_path / "pred2")], capsys)
    assert "dog/0000.jpg" in err and not (tmp_path / "pred2").exists(), err


@pytest.mark.parametrize("content", [os.urandom(4096), b"this is a text file, not arrays\n"], ids=["random", "text"])
def test_eval_fid_refuses_a_non_npz_before_loading_any_network(tmp_path, capsys, monkeypatch, content):
    from arvision.metrics import extractors

    def no_network(*a, **k):
        raise AssertionError("the feature network was built before the inputs were checked")
    monkeypatch.setattr(extractors, "build_extractor", no_network)
    import arvision.eval.generative as generative
    monkeypatch.setattr(generative, "build_extractor", no_network)

    bad = tmp_path / "samples.npz"
    bad.write_bytes(content)
    ref = tmp_path / "ref"
    ref.mkdir()
    err = one_line(["eval", "fid", str(bad), str(ref)], capsys)
    assert str(bad) in err and "ADM" in err and "allow_pickle" not in err and "unsafe" not in err.lower(), err
    # the reference is checked before the network too: a missing path, a bad .npz
    from PIL import Image
    Image.new("RGB", (8, 8)).save(ref / "a.png")
    Image.new("RGB", (8, 8)).save(ref / "b.png")
    err = one_line(["eval", "fid", str(ref), str(tmp_path / "missing")], capsys)
    assert str(tmp_path / "missing") in err, err
    err = one_line(["eval", "fid", str(ref), str(bad)], capsys)
    assert str(bad) in err and "allow_pickle" not in err, err


def test_ctrl_c_after_a_checkpoint_exits_like_sigterm(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "arvision", "pretrain", "--out", str(run), "train.max_steps=100000",
           "train.batch_size=4", "data.num_samples=64", "data.num_workers=0", "eval.knn=false",
           "train.precision=fp32", "train.ckpt_every=1", "train.keep_last=1", "train.log_every=1"]
    # a shell that starts a job in the background ignores SIGINT in it: give the run a terminal's default handling
    proc = subprocess.Popen(cmd, cwd=Path(arvision.__file__).parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 240
        while not list((run / "checkpoints").glob("step_*")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode not in (0, None), stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "--resume" in last and "step" in last, last
    step = int(last.split("step")[1].split(";")[0].split()[0])
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert saved[-1] == f"step_{step:08d}", (saved, last)
