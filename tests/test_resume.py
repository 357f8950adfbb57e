"""Pre-emption and resume in every case (issue 17): SIGTERM to a whole process group (DataLoader workers included,
with and without torchrun), checkpoints at epoch boundaries with evaluation on, a SIGTERM during the last step and a
finished run resumed, a changed config on resume, metrics rows after a crash, a logging window cut by SIGTERM."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import arvision
from arvision.cli import main
from arvision.config import load_config
from arvision.data import SyntheticShapes, pretrain_transform
from arvision.objectives import ClassificationObjective, NepaObjective
from arvision.train.checkpoint import checkpoint_dirs, load_state
from arvision.train.distributed import DistEnv
from arvision.train.engine import Trainer
from interruptions import Killed, interrupt_after_step, stop_at

REPO = Path(__file__).resolve().parents[1]


def rows(run_dir, split=None):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if split is None or r["split"] == split]


def by_step(run_dir, split, key):
    return {r["step"]: r[key] for r in rows(run_dir, split)}


def one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("arvision: error:") and "\n" not in err, err
    return err


# ------------------------------------------------------------------ 1. SIGTERM to every process of a group

# Run in place of `python -m arvision`: after STOP_AFTER optimizer steps of rank 0, a separate process (as a scheduler
# would) sends SIGTERM to this process's whole group, DataLoader workers included ("group"), or to the torchrun
# launcher ("launcher"), which sends it to the process group of every rank.
GROUP_DRIVER = '''
import os, signal, subprocess, sys, time
from arvision.cli import main
from arvision.objectives import NepaObjective

stop_after, who, done = int(os.environ["STOP_AFTER"]), os.environ["STOP_WHO"], [0]
after_step = NepaObjective.after_step

def signalling_after_step(self):
    after_step(self)
    done[0] += 1
    if done[0] == stop_after and int(os.environ.get("RANK", 0)) == 0:
        send = (f"os.killpg({os.getpgid(0)}, signal.SIGTERM)" if who == "group" else
                f"os.kill({os.getppid()}, signal.SIGTERM)")
        subprocess.run([sys.executable, "-c", "import os, signal; " + send], start_new_session=True, check=True)
        time.sleep(1.5)  # the signal reaches every process before this step's stop check

NepaObjective.after_step = signalling_after_step
main(sys.argv[1:])
'''

TINY_PRETRAIN = ["model.args={depth: 1, rope_rescale: null}", "train.precision=fp32", "train.log_every=1",
                 "eval.knn=false", "data.num_samples=128", "train.batch_size=32", "train.ckpt_every=0",
                 "data.num_workers=2"]


def launch(args, driver=None, env=None, nproc=1, new_session=False, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(29500 + (os.getpid() * 11 + len(args)) % 2000 + 300)] if nproc > 1 else [sys.executable]
    entry = [str(driver)] if driver else ["-m", "arvision"]
    r = subprocess.run(launcher + entry + args, capture_output=True, text=True, cwd=REPO, timeout=300,
                       start_new_session=new_session, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_with_loader_workers(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(GROUP_DRIVER)
    args = ["pretrain", *TINY_PRETRAIN, "train.max_steps=4"]
    launch([*args, "--out", str(tmp_path / "full")])
    part = ["--out", str(tmp_path / "part")]
    r = launch([*args, *part], driver, dict(STOP_AFTER="2", STOP_WHO="group"), new_session=True, check=False)
    assert "killed by signal" not in r.stderr and "stopped at step 2" in r.stderr, r.stderr[-3000:]
    assert [p.name for p in checkpoint_dirs(tmp_path / "part")] == ["step_00000002"]
    launch([*args, *part, "--resume"])
    full, resumed = by_step(tmp_path / "full", "train", "loss"), by_step(tmp_path / "part", "train", "loss")
    assert full == resumed and sorted(full) == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_to_torchrun_with_loader_workers_stops_both_ranks(tmp_path):
    """2 gloo processes with 2 loader workers each; torchrun sends SIGTERM to each rank's process group."""
    driver = tmp_path / "driver.py"
    driver.write_text(GROUP_DRIVER)
    args = ["pretrain", *TINY_PRETRAIN, "train.max_steps=3", "--out", str(tmp_path / "run")]
    r = launch(args, driver, dict(STOP_AFTER="1", STOP_WHO="launcher"), nproc=2, check=False)
    assert "killed by signal" not in r.stderr and r.stderr.count("stopped at step 1;") == 2, r.stderr[-3000:]
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_00000001"]
    launch([*args, "--resume"], nproc=2)
    assert sorted(by_step(tmp_path / "run", "train", "loss")) == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 3


# Fine-tuning whose evaluation loader worker (as a scheduler would) has the whole process group signalled while it
# reads the first validation image; the training loader's persistent workers are alive then too.
EVAL_DRIVER = '''
import os, signal, subprocess, sys, time
from arvision.cli import main
from arvision.eval import sharding

getitem = sharding.EvalShard.__getitem__

def signalling_getitem(self, i):
    try:
        os.close(os.open(os.environ["FLAG"], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return getitem(self, i)
    subprocess.run([sys.executable, "-c", f"import os, signal; os.killpg({os.getpgid(0)}, signal.SIGTERM)"],
                   start_new_session=True, check=True)
    time.sleep(0.5)
    return getitem(self, i)

sharding.EvalShard.__getitem__ = signalling_getitem
main(sys.argv[1:])
'''


def test_sigterm_to_the_process_group_during_evaluation(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(EVAL_DRIVER)
    run = tmp_path / "run"
    args = ["finetune", "--out", str(run), *FINETUNE, "data.num_workers=2", "train.epochs=2"]
    r = launch(args, driver, dict(FLAG=str(tmp_path / "flag")), new_session=True, check=False)
    # the evaluation after epoch 1 (step 4) completes, then the run stops with a checkpoint that says so
    assert "killed by signal" not in r.stderr and "stopped at step 4" in r.stderr, r.stderr[-3000:]
    assert sorted(by_step(run, "eval", "top1")) == [4]
    assert load_state(checkpoint_dirs(run)[-1])["evaluated_step"] == 4
    launch([*args, "--resume"])
    assert [r["step"] for r in rows(run, "eval")] == [4, 8]  # not evaluated twice
    assert [r["step"] for r in rows(run, "train")] == list(range(1, 9))


# ------------------------------------------------------------ 2, 3. evaluation at epoch boundaries and at the end

FINETUNE = ["model.args={depth: 1}", "data.num_samples=64", "train.batch_size=16", "train.log_every=1",
            "train.ckpt_every=0", "eval.max_samples=16", "eval.batch_size=16", "data.num_workers=0",
            "train.precision=fp32", "train.warmup_ratio=0.0", "train.warmup_steps=1", "train.blr=5e-3"]


def finetune(out, monkeypatch=None, stop=None, resume=False, *extra):
    """`arvision finetune` in this process: 4 steps an epoch, evaluated after each (raw and EMA weights)."""
    from arvision.tasks import finetune as task
    cfg = load_config("finetune", overrides=[*FINETUNE, "train.epochs=2", *extra])
    if stop is not None:
        stop_at(monkeypatch, ClassificationObjective, *stop)
    try:
        return task.run(cfg, out=str(out), resume=resume)
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "full"
    return out, finetune(out)


def assert_same_run(reference, out):
    ref_dir, ref_results = reference
    for split in ("train", "eval"):
        want = [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows(ref_dir, split)]
        got = [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows(out, split)]
        assert got == want, split
    results = json.loads((out / "results.json").read_text())
    for key in ("final", "best", "steps"):
        assert results[key] == ref_results[key], key


def test_sigterm_at_an_epoch_boundary_resumes_with_its_evaluation(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="stopped at step 4"):
        finetune(out, monkeypatch, (4,))
    state = load_state(checkpoint_dirs(out)[-1])
    assert state["step"] == 4 and state["evaluated_step"] is None  # saved before the evaluation due at step 4
    finetune(out, resume=True)
    assert_same_run(reference, out)


def test_periodic_checkpoint_at_an_epoch_boundary_then_a_crash(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        finetune(out, monkeypatch, (6, "kill"), False, "train.ckpt_every=4")
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000004"]
    assert load_state(checkpoint_dirs(out)[-1])["evaluated_step"] == 4  # written after that evaluation
    finetune(out, None, None, True, "train.ckpt_every=4")
    assert_same_run(reference, out)  # steps 5-6 and their rows are not there twice


def test_evaluation_draws_nothing_from_the_training_rng(tmp_path):
    """An evaluation loader makes a seed from the global RNG each time it is iterated; the Trainer gives evaluation
    its own stream, so training draws the same numbers with or without it, and evaluation the same whatever the
    state of training."""
    from torch.utils.data import DataLoader, TensorDataset
    data = SyntheticShapes(num_samples=8, split="train", transform=pretrain_transform(32))  # one step an epoch
    loader = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=4, shuffle=True)
    draws, after = {}, {}

    def evaluate(model, ema):
        draws.setdefault(every, []).append(torch.cat([x for (x,) in loader]).tolist())
        return {"score": 1.0}

    for every in (0, 1):  # without evaluation during training, and after each of 4 epochs
        cfg = load_config("pretrain", overrides=["train.max_steps=4", "train.batch_size=8", f"train.eval_every={every}",
                                                 "train.ckpt_every=0", "model.args={depth: 1}"]).train
        torch.manual_seed(0)
        t = Trainer(NepaObjective(arvision.create_model("nepa_tiny_patch4_32", depth=1)), data, cfg,
                    tmp_path / str(every), DistEnv(), num_workers=0, evaluate=evaluate)
        t.fit()
        after[every] = torch.get_rng_state()
    assert torch.equal(after[0], after[1])
    assert len(draws[1]) == 4 and all(d == draws[0][0] for d in draws[1])


@pytest.mark.parametrize("task", ["finetune", "segment"])
def test_sigterm_during_the_last_step_then_resume_finishes(task, tmp_path, monkeypatch, caplog):
    from arvision.objectives.segmentation import SegmentationObjective
    command, args, objective = (["finetune"], [*FINETUNE, "train.max_steps=4"], ClassificationObjective) \
        if task == "finetune" else (["segment", "train"], SEGMENT, SegmentationObjective)
    main([*command, "--out", str(tmp_path / "full"), *args])
    cmd = [*command, "--out", str(tmp_path / "run"), *args]
    stop_at(monkeypatch, objective, 4)
    with pytest.raises(SystemExit, match="stopped at step 4"):
        main(cmd)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "results.json").exists()
    main([*cmd, "--resume"])  # today: IndexError (no evaluation row)
    got = json.loads((tmp_path / "run" / "results.json").read_text())
    want = json.loads((tmp_path / "full" / "results.json").read_text())
    assert got["final"] == want["final"] and got["best"] == want["best"] and got["steps"] == 4
    assert len(rows(tmp_path / "run", "eval")) == 1
    # a finished run, resumed: one line says so; nothing is trained, evaluated or written again
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != "log.txt"}
    caplog.clear()
    with caplog.at_level("INFO", logger="arvision"):
        main([*cmd, "--resume"])
    finished = [r.getMessage() for r in caplog.records if "already finished" in r.getMessage()]
    assert len(finished) == 1 and "raise train.max_steps" in finished[0] and "\n" not in finished[0], caplog.text
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != "log.txt"} == before


SEGMENT = ["train.max_steps=4", "train.batch_size=4", "data.num_samples=16", "eval.max_samples=4",
           "data.num_workers=0", "train.precision=fp32", "train.log_every=1", "train.warmup_steps=1",
           "model.backbone_args={depth: 2, embed_dim: 32, num_heads: 2}", "model.args={channels: 16, aux_channels: 8}"]


# ------------------------------------------------------------------------------ 4. a changed config on resume

PRETRAIN = ["model.args={depth: 1}", "data.num_samples=64", "train.batch_size=16", "train.log_every=1",
            "train.ckpt_every=0", "eval.knn=false", "data.num_workers=0", "train.precision=fp32",
            "train.warmup_steps=0", "train.schedule=constant"]


def test_resume_refuses_changed_model_data_batch_or_seed_before_writing(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    stop_at(monkeypatch, NepaObjective, 2)
    with pytest.raises(SystemExit, match="stopped at step 2"):
        main(["pretrain", "--out", str(run), *PRETRAIN, "train.max_steps=4"])
    monkeypatch.undo()
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    for changed, named in ((["model.name=nepa_small_patch4_32"], "model.name"),
                           (["train.batch_size=32", "train.seed=7"], "train.batch_size, train.seed"),
                           (["--data", "synthetic"], "data.source")):
        err = one_line_error(["pretrain", "--out", str(run), "--resume", *changed], capsys)
        assert named in err and "cannot change on resume" in err, err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files  # nothing written


def test_resume_of_a_run_saved_before_a_key_existed_takes_its_default_and_refuses_another(tmp_path, monkeypatch,
                                                                                           capsys):
    run = tmp_path / "run"
    stop_at(monkeypatch, NepaObjective, 2)
    with pytest.raises(SystemExit, match="stopped at step 2"):
        main(["pretrain", "--out", str(run), *PRETRAIN, "train.max_steps=4"])
    monkeypatch.undo()
    # a run started by an arvision that had no train.ema_warmup_power (a key that cannot change on resume)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["train"]["ema_warmup_power"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    capsys.readouterr()
    err = one_line_error(["pretrain", "--out", str(run), "--resume", "train.ema_warmup_power=0.75"], capsys)
    assert "train.ema_warmup_power" in err and "cannot change on resume" in err, err
    main(["pretrain", "--out", str(run), "--resume"])
    assert sorted(by_step(run, "train", "loss")) == [1, 2, 3, 4]


def test_resume_applies_a_changed_lr_and_max_steps_and_logs_them(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    stop_at(monkeypatch, NepaObjective, 2)
    with pytest.raises(SystemExit, match="stopped at step 2"):
        main(["pretrain", "--out", str(run), *PRETRAIN, "train.max_steps=4", "train.blr=4e-3"])
    monkeypatch.undo()
    # --resume alone continues the saved config (not the defaults); overrides change only what they name
    with caplog.at_level("INFO", logger="arvision"):
        main(["pretrain", "--out", str(run), "--resume", "train.blr=8e-3", "train.max_steps=6"])
    lrs = by_step(run, "train", "lr")
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
    assert lrs[2] == pytest.approx(4e-3 * 16 / 256) and lrs[3] == pytest.approx(8e-3 * 16 / 256)
    assert "train.blr 0.004 -> 0.008" in caplog.text and "train.max_steps 4 -> 6" in caplog.text
    assert "blr: 0.008" in (run / "config.yaml").read_text()
    state = load_state(checkpoint_dirs(run)[-1])
    assert state["step"] == 6 and state["optimizer"]["param_groups"][0]["lr_base"] == pytest.approx(8e-3 * 16 / 256)


# ------------------------------------------------------------------- 7. metrics rows and the logging window

def _trainer(run_dir, steps=8, seed=0, **kw):
    torch.manual_seed(seed)
    model = arvision.create_model("nepa_tiny_patch4_32", depth=1)
    data = SyntheticShapes(num_samples=64, split="train", transform=pretrain_transform(32))
    cfg = load_config("pretrain", overrides=[f"train.{k}={v}" for k, v in {
        **dict(max_steps=steps, batch_size=16, blr=5e-3, log_every=1, ckpt_every=4, precision="fp32"), **kw}.items()])
    return Trainer(NepaObjective(model), data, cfg.train, run_dir, DistEnv(), num_workers=0)


def _tensorboard_steps(run_dir, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(run_dir) / "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_rows_after_the_last_checkpoint_are_not_kept_twice(tmp_path):
    t = _trainer(tmp_path, steps=8)
    interrupt_after_step(t, 6, how="kill")  # as SIGKILL: no save, the rows of steps 5 and 6 are already written
    with pytest.raises(Killed):
        t.fit()
    t.writer.close()  # what reached the disk before the kill
    resumed = _trainer(tmp_path, steps=8, seed=1)
    resumed.resume()
    resumed.fit()
    assert [r["step"] for r in rows(tmp_path, "train")] == list(range(1, 9))
    assert _tensorboard_steps(tmp_path) == list(range(1, 9))


def test_sigterm_keeps_the_partial_logging_window(tmp_path):
    _trainer(tmp_path / "full", log_every=4).fit()
    t = _trainer(tmp_path / "part", log_every=4)
    interrupt_after_step(t, 6)
    with pytest.raises(SystemExit, match="stopped at step 6"):
        t.fit()
    resumed = _trainer(tmp_path / "part", log_every=4, seed=1)
    resumed.resume()
    resumed.fit()
    want = {s: (r["loss"], r["grad_norm"]) for s, r in ((r["step"], r) for r in rows(tmp_path / "full", "train"))}
    got = {s: (r["loss"], r["grad_norm"]) for s, r in ((r["step"], r) for r in rows(tmp_path / "part", "train"))}
    assert sorted(want) == [4, 8] and got == want  # step 8's row averages steps 5-8, as without the stop


# ------------------------------------------------------------------------------- 5, 6. tokenizer encode

def _encode_args(tok, out, *extra):
    return ["tokenizer", "encode", "--tokenizer", str(tok), "--data", "synthetic", "--out", str(out), "--limit", "12",
            "--img-size", "16", "--batch-size", "4", "--num-workers", "0", *extra]


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """Two VQ tokenizers with one config and different weights, saved as arvision checkpoints."""
    root = tmp_path_factory.mktemp("toks")
    for seed in (0, 1):
        torch.manual_seed(seed)
        arvision.save_model(arvision.create_model("vq_f4_32px", ch=32), root / f"tok{seed}")
    return root / "tok0", root / "tok1"


def test_encode_refuses_a_cache_made_by_other_weights_or_settings(two_tokenizers, tmp_path, monkeypatch, capsys):
    from arvision.data import token_cache as tc, token_cache_writer as writer
    a, b = two_tokenizers
    cache = tmp_path / "cache"
    real_write, writes = writer._write_header, []

    def interrupt_after_one_batch(path, obj):
        real_write(path, obj)
        writes.append(obj)
        if len(writes) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(writer, "_write_header", interrupt_after_one_batch)
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # Ctrl-C after the first batch
        main(_encode_args(a, cache))
    monkeypatch.undo()
    assert tc.read_header(cache)["encoded"] == 4
    # completing A's partial cache with B would mix two encodings
    err = one_line_error(_encode_args(b, cache), capsys)
    assert "tokenizer weights" in err and "--overwrite" in err, err
    main(_encode_args(a, cache))
    capsys.readouterr()
    # a complete cache of A asked for with B, or with other data settings, is not returned as it is
    assert "tokenizer weights" in one_line_error(_encode_args(b, cache), capsys)
    assert "copies" in one_line_error(_encode_args(a, cache, "--no-flip"), capsys)
    assert "img_size" in one_line_error([*_encode_args(a, cache), "--img-size", "8"], capsys)
    # --overwrite re-encodes: the codes are B's
    main(_encode_args(b, cache, "--overwrite"))
    main(_encode_args(b, tmp_path / "fresh"))
    got, want = tc.TokenCache(cache, flip=False), tc.TokenCache(tmp_path / "fresh", flip=False)
    assert torch.equal(got.grids(0), want.grids(0)) and torch.equal(got.grids(1), want.grids(1))
    assert got.info["tokenizer_sha256"] == want.info["tokenizer_sha256"]


def test_encode_checks_the_free_space_before_writing(two_tokenizers, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 2048, 2048))
    err = one_line_error(_encode_args(two_tokenizers[0], tmp_path / "cache"), capsys)
    assert "free" in err and "space" in err, err
    assert not (tmp_path / "cache").exists()


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces (unshare)")
def test_encode_on_a_full_disk_is_a_one_line_error_not_sigbus(tmp_path):
    """A real full file system: a tmpfs that holds the tokenizer copy and half of the token array."""
    torch.manual_seed(0)
    tok = arvision.save_model(arvision.create_model("kl_f4_32px", ch=32), tmp_path / "tok")
    args = ["-m", "arvision", "tokenizer", "encode", "--tokenizer", str(tok), "--data", "synthetic", "--limit", "128",
            "--img-size", "32", "--batch-size", "64", "--num-workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "ref")], check=True, capture_output=True, env=env)
    used = lambda p: p.stat().st_blocks * 512 if p.is_file() else 0
    tokens = used(tmp_path / "ref" / "tokens.npy")
    rest = sum(used(p) for p in (tmp_path / "ref").rglob("*")) - tokens
    size = (rest + tokens // 2) // 4096 * 4096 + 8 * 4096
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    py = " ".join([sys.executable, *args, "--out", str(mnt / "cache")])
    script = (f"mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99\n"
              f"{py} 2> {tmp_path}/err1; echo $? > {tmp_path}/rc1\n"
              f"mount -o remount,size=64m {mnt}\n"
              f"{py} 2> {tmp_path}/err2; echo $? > {tmp_path}/rc2\n"
              f"cp -r {mnt}/cache {tmp_path}/cache\n")
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode != 99, r.stderr
    rc1, err1 = int((tmp_path / "rc1").read_text()), (tmp_path / "err1").read_text().strip()
    assert rc1 == 2 and err1.startswith("arvision: error:") and "\n" not in err1 and "space" in err1, (rc1, err1)
    assert int((tmp_path / "rc2").read_text()) == 0, (tmp_path / "err2").read_text()[-2000:]
    from arvision.data.token_cache import TokenCache
    a, b = TokenCache(tmp_path / "ref", flip=False), TokenCache(tmp_path / "cache", flip=False)
    assert torch.equal(a.grids(0), b.grids(0)) and torch.equal(a.grids(1), b.grids(1))
