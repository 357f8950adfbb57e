"""Two gloo CPU processes under torchrun: DDP / FSDP2 equal one process, SIGTERM on one rank or on the launcher stops
every rank at the same step with a checkpoint that resumes exactly, FSDP pretraining + probes and fine-tuning +
evaluation, DDP fine-tuning of a backbone pretrained with a mask token."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import arvision
from arvision.train.checkpoint import checkpoint_dirs

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.args={depth: 2, rope_rescale: null}", "train.precision=fp32", "data.num_workers=0",
        "train.log_every=1"]
COMMON = [*TINY, "data.num_samples=256", "train.batch_size=32", "train.max_steps=4", "eval.knn=false",
          "train.blr=1e-2"]

# Run by torchrun in place of `-m arvision`: after STOP_AFTER optimizer steps of this process, rank STOP_RANK sends
# SIGTERM to itself ("self") or to the torchrun launcher ("launcher", which forwards it to every rank).
DRIVER = '''
import os, signal, sys, time
from arvision.cli import main
from arvision.objectives import NepaObjective

stop_after, who = int(os.environ["STOP_AFTER"]), os.environ["STOP_WHO"]
rank, done = int(os.environ["RANK"]), [0]
after_step = NepaObjective.after_step

def counting_after_step(self):
    after_step(self)
    done[0] += 1
    if done[0] == stop_after and rank == int(os.environ["STOP_RANK"]):
        os.kill(os.getpid() if who == "self" else os.getppid(), signal.SIGTERM)
        time.sleep(1.0)  # the launcher's forwarded SIGTERM arrives before this step's stop check

NepaObjective.after_step = counting_after_step
main(sys.argv[1:])
'''


def launch(task, args, nproc=2, driver=None, env=None, check=True):
    """Run `arvision <task> args` in `nproc` torchrun processes (or one plain process); returns the finished
    process. With `check`, a non-zero exit fails the test with the end of stderr."""
    port = str(29500 + (os.getpid() * 7 + hash(tuple(args))) % 2000)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                port] if nproc > 1 else [sys.executable]
    entry = [str(driver)] if driver else ["-m", "arvision"]
    r = subprocess.run(launcher + entry + [task, *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def last_weights(run_dir):
    return load_file(checkpoint_dirs(run_dir)[-1] / "model.safetensors")


@pytest.mark.parametrize("strategy,micro", [("ddp", 16), ("fsdp", 16), ("fsdp", 8)])
def test_two_processes_match_one_process(tmp_path, strategy, micro):
    # micro 8: two micro-batches per rank, FSDP2 reduce-scatters only after the second (set_requires_gradient_sync)
    launch("pretrain", ["--out", str(tmp_path / "one"), *COMMON, "train.micro_batch_size=16"], nproc=1)
    launch("pretrain", ["--out", str(tmp_path / "two"), *COMMON, f"train.distributed={strategy}",
                        f"train.micro_batch_size={micro}"])
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for s in a:
        assert a[s] == pytest.approx(b[s], abs=1e-5)
    wa, wb = last_weights(tmp_path / "one"), last_weights(tmp_path / "two")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


# Run by torchrun: the Trainer with train.fsdp_mixed_precision set (bf16 all-gathers, fp32 gradient reduction).
MIXED_DRIVER = '''
import sys
from arvision.cli import main
from arvision.train import engine

init = engine.Trainer.__init__

def mixed_init(self, objective, train_set, cfg, *args, **kwargs):
    cfg["fsdp_mixed_precision"] = True
    init(self, objective, train_set, cfg, *args, **kwargs)

engine.Trainer.__init__ = mixed_init
main(sys.argv[1:])
'''


def test_fsdp_mixed_precision_trains_like_autocast(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(MIXED_DRIVER)
    args = [*COMMON, "train.precision=bf16", "train.distributed=fsdp"]
    launch("pretrain", ["--out", str(tmp_path / "amp"), *args])
    launch("pretrain", ["--out", str(tmp_path / "mixed"), *args], driver=driver)
    a, b = losses(tmp_path / "amp"), losses(tmp_path / "mixed")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert all(abs(a[s] - b[s]) < 2e-2 for s in a), (a, b)  # bf16 parameters instead of bf16 autocast casts
    wa, wb = last_weights(tmp_path / "amp"), last_weights(tmp_path / "mixed")
    assert all(wb[k].dtype == torch.float32 for k in wb)  # the sharded fp32 master weights are what is saved
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # the policy was applied


def test_sigterm_stops_every_rank_and_resumes_exactly(tmp_path):
    args = [*COMMON, "train.max_steps=8", "train.ckpt_every=0"]
    launch("pretrain", ["--out", str(tmp_path / "full"), *args])
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = ["--out", str(tmp_path / "part"), *args]

    # SIGTERM to rank 1 only, after its 3rd step: both ranks stop after step 3 and save it
    r = launch("pretrain", run, driver=driver, env=dict(STOP_AFTER="3", STOP_WHO="self", STOP_RANK="1"), check=False)
    assert r.returncode != 0 and "stopped at step 3" in r.stderr, r.stderr[-3000:]
    assert [p.name for p in checkpoint_dirs(tmp_path / "part")] == ["step_00000003"]

    # resumed, then SIGTERM to the launcher (torchrun forwards it to every rank) 2 steps later
    r = launch("pretrain", [*run, "--resume"], driver=driver,
               env=dict(STOP_AFTER="2", STOP_WHO="launcher", STOP_RANK="0"), check=False)
    assert r.returncode != 0 and "stopped at step 5" in r.stderr, r.stderr[-3000:]
    assert checkpoint_dirs(tmp_path / "part")[-1].name == "step_00000005"

    launch("pretrain", [*run, "--resume"])
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert a.keys() == b.keys() == set(range(1, 9))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    wa, wb = last_weights(tmp_path / "full"), last_weights(tmp_path / "part")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdp_pretraining_then_probes(tmp_path):
    from arvision.config import load_config
    from arvision.tasks.pretrain import probe_report

    probes = ["eval.knn=true", "eval.linear=false", "eval.blocks=[last]", "eval.train_samples=64",
              "eval.val_samples=32", "eval.knn_k=5"]
    args = [*COMMON, *probes, "train.max_steps=2"]
    launch("pretrain", ["--out", str(tmp_path), *args, "train.distributed=fsdp"])
    got = json.loads((tmp_path / "results.json").read_text())["probes"]
    # the probes of the FSDP run are those of the saved (full) weights, computed here in one process
    model = arvision.load_model(checkpoint_dirs(tmp_path)[-1])
    want = probe_report(load_config("pretrain", overrides=args), model, 32, torch.device("cpu"))
    assert got == want


FINETUNE = [*TINY, "data.num_samples=64", "train.batch_size=16", "train.max_steps=3", "train.ema_decay=0",
            "train.eval_every=0", "eval.max_samples=31", "eval.batch_size=8", "train.ckpt_every=0"]


def test_fsdp_finetuning_then_evaluation(tmp_path):
    from torch.utils.data import DataLoader

    from arvision.data import build_dataset, eval_transform
    from arvision.eval import evaluate_classifier
    from arvision.data import fixed_subset

    launch("finetune", ["--out", str(tmp_path), *FINETUNE, "train.distributed=fsdp"])
    got = json.loads((tmp_path / "results.json").read_text())["final"]
    # every one of the 31 images once (one rank pads its shard), scored as one process scores the saved weights
    model = arvision.load_model(checkpoint_dirs(tmp_path)[-1])
    val = fixed_subset(build_dataset("synthetic", "val", eval_transform(32), img_size=32), 31)
    want = evaluate_classifier(model, DataLoader(val, batch_size=8), "cpu", torch.bfloat16, causal=False)
    assert got["n"] == want["n"] == 31
    assert got["top1"] == pytest.approx(want["top1"]) and got["loss"] == pytest.approx(want["loss"], abs=1e-3)


def test_ddp_finetuning_of_a_backbone_pretrained_with_a_mask_token(tmp_path):
    torch.manual_seed(0)
    pre = arvision.create_model("nepa_tiny_patch4_32", depth=2, use_mask_token=True, rope_rescale=None)
    arvision.save_model(pre, tmp_path / "pre")
    launch("finetune", ["--out", str(tmp_path / "run"), *FINETUNE, f"model.init={tmp_path / 'pre'}",
                        "train.distributed=ddp"])
    tuned = arvision.load_model(checkpoint_dirs(tmp_path / "run")[-1])
    assert tuned.mask_token is None and tuned.config.use_mask_token is False
    assert torch.equal(tuned.patch_embed.weight, pre.patch_embed.weight)  # frozen
    assert not torch.equal(tuned.blocks[0].attn.qkv.weight, pre.blocks[0].attn.qkv.weight)  # trained
