import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import arvision
from arvision.config import load_config
from arvision.data import SyntheticShapes, pretrain_transform
from arvision.objectives import NepaObjective, Objective
from arvision.objectives.param_groups import llrd_groups, weight_decay_groups
from arvision.train.checkpoint import checkpoint_dirs
from arvision.train.distributed import DistEnv
from arvision.train.engine import Trainer
from arvision.train.sampler import ResumableSampler
from interruptions import interrupt_after_step


# ------------------------------------------------------------------ config


def test_cli_reports_one_line_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "arvision", *a], capture_output=True, text=True,
                                    cwd=tmp_path)
    r = run("pretrain", "train.epoch=1")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "train.epochs" in r.stderr
    r = run("pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run("eval", "knn", str(tmp_path / "nockpt"), "--data", "synthetic")
    assert r.returncode == 2 and "not found" in r.stderr


# ----------------------------------------------------------------- sampler
def test_sampler_one_process_with_accumulation_equals_two_processes():
    one = list(ResumableSampler(64, 16, 8, rank=0, world_size=1, seed=3))
    r0 = list(ResumableSampler(64, 16, 8, rank=0, world_size=2, seed=3))
    r1 = list(ResumableSampler(64, 16, 8, rank=1, world_size=2, seed=3))
    for step in range(4):
        a = one[step * 16:(step + 1) * 16]
        assert a[:8] == r0[step * 8:(step + 1) * 8] and a[8:] == r1[step * 8:(step + 1) * 8]
    s = ResumableSampler(64, 16, 8, seed=3)
    s.set_epoch(0, start_step=2)
    assert list(s) == one[32:]
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in one]  # a new permutation each epoch
    with pytest.raises(ValueError, match="not a multiple"):
        ResumableSampler(64, 16, 5)


def test_seeded_dataset_seeds_the_transform_and_leaves_other_streams_alone(monkeypatch):
    """Each (index, seed) gets the same augmentation every time; the model's random streams are untouched; and the
    accelerator generators are not reseeded per sample (torch.manual_seed did: on a GPU with num_workers=0 it
    reseeded the training's CUDA stream, on a CPU it cost a quarter of a small generator's step in stack traces)."""
    from arvision.train.sampler import SeededDataset

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3) + i

    def no_global_seeding(seed):
        raise AssertionError("SeededDataset called torch.manual_seed")

    monkeypatch.setattr(torch, "manual_seed", no_global_seeding)
    data = SeededDataset(Noisy())
    torch.default_generator.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = data[(1, 7)], data[(1, 7)], data[(1, 8)]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_weight_decay_groups_follow_the_official_rule():
    model = arvision.create_model("nepa_tiny_patch4_32", depth=1)
    groups = weight_decay_groups(model, 1e-3, 0.05, 10)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    assert decayed == {"cls_token", "patch_embed.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                       "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0


# ------------------------------------------------------------------ trainer
def _train_cfg(**kw):
    cfg = load_config("pretrain", overrides=[f"train.{k}={v}" for k, v in kw.items()])
    return cfg.train


def _trainer(run_dir, steps=8, seed=0, num_workers=0, **kw):
    torch.manual_seed(seed)
    model = arvision.create_model("nepa_tiny_patch4_32", depth=2)
    data = SyntheticShapes(num_samples=128, split="train", transform=pretrain_transform(32))
    cfg = _train_cfg(**{**dict(max_steps=steps, batch_size=16, blr=5e-3, log_every=1, ckpt_every=4, keep_last=3), **kw})
    return Trainer(NepaObjective(model), data, cfg, run_dir, DistEnv(), num_workers=num_workers)


def _losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_loss_decreases(tmp_path):
    t = _trainer(tmp_path, steps=30, precision="fp32")
    t.fit()
    losses = list(_losses(tmp_path).values())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
    assert (tmp_path / "loss_curve.png").exists()
    ckpt = checkpoint_dirs(tmp_path)[-1]
    loaded = arvision.load_model(ckpt)
    for k, v in t.objective.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_interrupted_run_resumes_exactly(tmp_path, num_workers):
    full = tmp_path / "full"
    _trainer(full, num_workers=num_workers, ema_decay=0.9).fit()

    part = tmp_path / "part"
    t = _trainer(part, num_workers=num_workers, ema_decay=0.9)
    interrupt_after_step(t, 5)  # SIGTERM (as a cluster scheduler sends) in the middle of the run
    with pytest.raises(SystemExit, match="resume"):
        t.fit()
    assert [p.name for p in checkpoint_dirs(part)] == ["step_00000004", "step_00000005"]

    # a fresh process-like restart: other global RNG state, new model and trainer
    resumed = _trainer(part, seed=123, num_workers=num_workers, ema_decay=0.9)
    resumed.resume()
    assert resumed.step == 5
    resumed.fit()
    a, b = _losses(full), _losses(part)
    assert a.keys() == b.keys() == set(range(1, 9))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    fa, fb = checkpoint_dirs(full)[-1], checkpoint_dirs(part)[-1]
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(fa / name), load_file(fb / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_directory_is_not_overwritten(tmp_path):
    from arvision.tasks.common import prepare_run
    cfg = load_config("pretrain")
    _trainer(tmp_path, steps=4).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        prepare_run(cfg, "pretrain", str(tmp_path), resume=False)


# ---------------------------------------------------------------- contract
class ProbeObjective(Objective):
    """An objective with its own trainable layer and buffer next to the model (state outside objective.model)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.probe = torch.nn.Linear(model.embed_dim, 10)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, inputs, targets):
        self.calls += 1
        logits = self.probe(self.model.forward_features(inputs).mean(1))
        return torch.nn.functional.cross_entropy(logits, targets), {}


def test_objective_state_outside_the_model_is_saved_and_resumed(tmp_path):
    data = SyntheticShapes(num_samples=32, split="train", transform=pretrain_transform(32))
    cfg = _train_cfg(max_steps=2, batch_size=8, log_every=1, ckpt_every=0, precision="fp32")
    torch.manual_seed(0)
    t = Trainer(ProbeObjective(arvision.create_model("nepa_tiny_patch4_32", depth=1)), data, cfg, tmp_path,
                DistEnv(), num_workers=0)
    t.fit()
    ckpt = checkpoint_dirs(tmp_path)[-1]
    assert set(load_file(ckpt / "model.safetensors")) == set(t.objective.model.state_dict())
    assert set(torch.load(ckpt / "state.pt", weights_only=True)["objective"]) == {"probe.weight", "probe.bias",
                                                                                  "calls"}
    torch.manual_seed(1)
    again = Trainer(ProbeObjective(arvision.create_model("nepa_tiny_patch4_32", depth=1)), data, cfg, tmp_path,
                    DistEnv(), num_workers=0)
    again.resume()
    for k, v in t.objective.state_dict().items():
        assert torch.equal(again.objective.state_dict()[k], v), k
    assert int(again.objective.calls) == 2


def test_param_groups_must_cover_every_trainable_parameter_once(tmp_path):
    data = SyntheticShapes(num_samples=32, split="train")
    cfg = _train_cfg(max_steps=1, batch_size=8)
    model = arvision.create_model("nepa_tiny_patch4_32", depth=1)

    class Partial(NepaObjective):
        def param_groups(self, lr, weight_decay, warmup_steps):
            return [dict(params=list(self.model.blocks.parameters()), weight_decay=0.0, lr_base=lr, lr_scale=1.0,
                         warmup_steps=warmup_steps)]

    class Twice(NepaObjective):
        def param_groups(self, lr, weight_decay, warmup_steps):
            groups = super().param_groups(lr, weight_decay, warmup_steps)
            return groups + [dict(groups[0], params=groups[0]["params"][:1])]

    with pytest.raises(ValueError, match="leaves out the trainable parameters model.cls_token"):
        Trainer(Partial(model), data, cfg, tmp_path, DistEnv(), num_workers=0)
    with pytest.raises(ValueError, match="more than once"):
        Trainer(Twice(model), data, cfg, tmp_path, DistEnv(), num_workers=0)
    with pytest.raises(TypeError, match="Objective"):
        Trainer(torch.nn.Linear(2, 2), data, cfg, tmp_path, DistEnv(), num_workers=0)


def test_layer_decay_finds_blocks_through_wrappers():
    model = arvision.create_model("nepa_tiny_patch4_32", depth=3, num_classes=5)
    plain = llrd_groups(model, 1.0, 0.05, 10, llrd=0.5)
    compiled = llrd_groups(torch.compile(model), 1.0, 0.05, 10, llrd=0.5)  # names gain "_orig_mod."
    scale = {id(p): g["lr_scale"] for g in plain for p in g["params"]}
    assert scale[id(model.blocks[0].attn.qkv.weight)] == 0.25 and scale[id(model.cls_token)] == 0.125
    assert {id(p): g["lr_scale"] for g in compiled for p in g["params"]} == scale
    with pytest.raises(ValueError, match="blocks"):
        llrd_groups(torch.nn.Sequential(model), 1.0, 0.05, 10, llrd=0.5)
