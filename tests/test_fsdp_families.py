"""FSDP2 for every model family (issue 15, items 10 and 11): each family names its own shard units (every transformer
block, a tokenizer's resolution stages); two gloo processes really shard each family (about half the parameters on
each) and train as one process does, with the weight EMA kept sharded and saved / resumed like the model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

import arvision
from arvision.config import load_config
from arvision.models.segmentation import Segmentor, SegmentorConfig
from arvision.objectives import NepaObjective
from arvision.objectives.heptapod import HeptapodLossConfig, HeptapodObjective
from arvision.objectives.segmentation import SegmentationObjective
from arvision.objectives.tokenizer import TokenizerLossConfig, TokenizerObjective
from arvision.train.checkpoint import checkpoint_dirs
from arvision.train.distributed import DistEnv
from arvision.train.engine import Trainer

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("vit", "generator", "segmentor", "tokenizer")


class Indexed(Dataset):
    """16 deterministic samples: ``make(generator)`` seeded by the index, the same in every process."""

    def __init__(self, make, n=16):
        self.make, self.n = make, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.make(torch.Generator().manual_seed(i))


def build(family, restart_after=0):
    """(objective, dataset) of a tiny model of ``family`` with no random draws in its loss (equal runs in any number
    of processes)."""
    torch.manual_seed(0)
    if family == "vit":
        model = arvision.create_model("nepa_tiny_patch4_32", depth=2, rope_rescale=None)
        return NepaObjective(model), Indexed(lambda g: (torch.randn(3, 32, 32, generator=g), 0))
    if family == "generator":
        model = arvision.create_model("heptapod_tiny", depth=2, head_depth=2, embed_dim=32, num_heads=2,
                                      codebook_size=16, grid_size=4)
        objective = HeptapodObjective(model, HeptapodLossConfig(timesteps_per_image=0))  # every timestep
        return objective, Indexed(lambda g: (torch.randint(0, 16, (16,), generator=g),
                                             int(torch.randint(0, 10, (), generator=g))))
    if family == "segmentor":
        backbone = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, rope_rescale=None)
        model = Segmentor(SegmentorConfig(backbone=backbone, num_classes=5, out_indices=[0, 1, 2, 3], channels=16,
                                          aux_channels=8, dropout=0.0))
        for m in model.modules():  # fixed BatchNorm statistics: with batch statistics the layers before each BN get
            if isinstance(m, torch.nn.BatchNorm2d):  # gradients of float-noise size, which Adam scales up to lr
                m.eval()
        return SegmentationObjective(model), Indexed(lambda g: (torch.randn(3, 32, 32, generator=g),
                                                               torch.randint(0, 5, (32, 32), generator=g)))
    model = arvision.create_model("vq_f4_32px", ch=32, ch_mult=(1, 1, 2), z_channels=32, codebook_size=64,
                                  usage_window=256)
    objective = TokenizerObjective(model, TokenizerLossConfig(restart_after=restart_after))
    return objective, Indexed(lambda g: (torch.rand(3, 16, 16, generator=g) * 2 - 1, 0))


def train_cfg(**kw):
    # eps 1e-4: a gradient of float-noise size (the bias before a GroupNorm gets none but rounding) moves its weight
    # by about lr * g / eps instead of lr * sign(g), so summing the gradients in another order changes nothing
    over = {**dict(max_steps=3, batch_size=8, micro_batch_size=4, lr=3e-3, warmup_steps=0, schedule="constant",
                   precision="fp32", log_every=1, ckpt_every=2, ema_decay=0.5, distributed="fsdp", eps=1e-4), **kw}
    return load_config("pretrain", overrides=[f"train.{k}={v}" for k, v in over.items()]).train


def run_families(out: Path, env: DistEnv) -> dict:
    """Train every family for 3 steps (FSDP2 when ``env`` has 2 processes, plain otherwise) and report, per family,
    the parameters this process holds, the total and the number of FSDP units; under FSDP also a VQ tokenizer with
    dead-code restarts, and the ViT resumed from its step-2 checkpoint (model, optimizer and sharded EMA)."""
    from torch.distributed.fsdp import FSDPModule

    report = {}
    for family in FAMILIES:
        objective, data = build(family)
        trainer = Trainer(objective, data, train_cfg(), out / family, env, num_workers=0)
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in objective.parameters())
        report[family] = dict(local=local, total=sum(p.numel() for p in objective.parameters()),
                              units=sum(isinstance(m, FSDPModule) for m in objective.modules()),
                              shard_units=len(objective.shard_units()),
                              in_units=sum(p.numel() for u in objective.shard_units() for p in u.parameters()))
        trainer.fit()
    if env.enabled:
        objective, data = build("tokenizer", restart_after=1)
        Trainer(objective, data, train_cfg(max_steps=2), out / "restarts", env, num_workers=0).fit()
        report["restarted"] = int(objective.restarted)
        objective, data = build("vit")
        trainer = Trainer(objective, data, train_cfg(), out / "vit_resumed", env, num_workers=0)
        trainer.resume(checkpoint_dirs(out / "vit")[0])
        trainer.fit()
    return report


DRIVER = '''
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_fsdp_families import run_families
from arvision.train.distributed import init_distributed

env = init_distributed("cpu")
report = run_families(Path(sys.argv[1]), env)
Path(sys.argv[1], f"report_{env.rank}.json").write_text(json.dumps(report))
'''


def _weights(run_dir, name="model.safetensors"):
    sd = load_file(checkpoint_dirs(run_dir)[-1] / name)
    return {k: v for k, v in sd.items() if not k.endswith("codebook_used")}  # each process's recent codes


def _losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_every_family_names_its_shard_units():
    cases = {"nepa_tiny_patch4_32": {}, "heptapod_tiny": {}, "heptapod_tiny/continuous": dict(token_type="continuous"),
             "heptapod_tiny/none": dict(head_type="none"), "upernet_nepa_tiny_patch4_32": {}, "vq_f4_32px": {},
             "kl_f4_32px": {}}
    for name, kw in cases.items():
        model = arvision.create_model(name.split("/")[0], **kw)
        units = build_objective_units(model)
        ids = {id(u) for u in units}
        for trunk in (getattr(model, "backbone", None), getattr(model, "head", None), getattr(model, "denoiser", None),
                      model):
            for blk in getattr(trunk, "blocks", []):  # every transformer block (and diffusion MLP block) is one
                assert id(blk) in ids, (name, type(blk).__name__)
        for coder in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
            if coder is not None:  # every resolution stage of a tokenizer, and its mid block
                stages = list(getattr(coder, "conv_blocks", None) or getattr(coder, "down", None) or coder.up)
                assert all(id(s) in ids for s in [*stages, coder.mid]), name
        inside = sum(p.numel() for u in units for p in u.parameters())
        assert inside > 0.8 * sum(p.numel() for p in model.parameters()), name  # the root gathers little


def build_objective_units(model):
    """The shard units the Trainer would use for ``model`` (through the family's objective)."""
    from arvision.objectives.base import Objective

    class Plain(Objective):
        def __init__(self, m):
            super().__init__()
            self.model = m

    return Plain(model).shard_units()


@pytest.mark.slow
def test_fsdp_shards_every_family_and_equals_one_process(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    port = str(29500 + (os.getpid() * 11) % 2000)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                        str(driver), str(tmp_path / "two"), str(Path(__file__).parent)], capture_output=True,
                       text=True, cwd=REPO, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    one = run_families(tmp_path / "one", DistEnv())
    ranks = [json.loads((tmp_path / "two" / f"report_{i}.json").read_text()) for i in range(2)]
    for family in FAMILIES:
        total = one[family]["total"]
        locals_ = [rep[family]["local"] for rep in ranks]
        assert sum(locals_) == total and all(0.4 * total < n < 0.6 * total for n in locals_), (family, locals_)
        # each shard unit is its own FSDP module (gathered only around its forward), plus the root
        assert ranks[0][family]["units"] == one[family]["shard_units"] + 1 > 2, family
        assert one[family]["in_units"] > 0.8 * total, family
        a, b = _losses(tmp_path / "one" / family), _losses(tmp_path / "two" / family)
        assert a.keys() == b.keys() == {1, 2, 3}, family
        assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (family, a, b)
        for name in ("model.safetensors", "ema.safetensors"):  # the sharded EMA is saved whole, as the model is
            wa, wb = _weights(tmp_path / "one" / family, name), _weights(tmp_path / "two" / family, name)
            assert wa.keys() == wb.keys(), (family, name)
            for k in wa:
                torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4, msg=f"{family} {name} {k}")
    ema, raw = _weights(tmp_path / "two" / "vit", "ema.safetensors"), _weights(tmp_path / "two" / "vit")
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # an average, not a copy
    assert ranks[0]["restarted"] > 0  # dead-code restarts re-seed a sharded codebook
    for name in ("model.safetensors", "ema.safetensors"):  # resumed from step 2 under FSDP: the same step 3
        wa, wb = _weights(tmp_path / "two" / "vit", name), _weights(tmp_path / "two" / "vit_resumed", name)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-6, msg=f"resumed {name} {k}")
