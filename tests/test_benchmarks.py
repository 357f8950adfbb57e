"""Smoke tests of benchmarks/bench_pretrain.py: both training steps run and are timed, the FLOP count matches an
analytic count, and the official-like side computes the same loss and gradients as arvision from the same weights
(so the throughput comparison is apples to apples)."""
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_pretrain as bp  # noqa: E402
import official_like  # noqa: E402
from official_like import official_param_groups  # noqa: E402

from arvision.checkpoints import official_to_arvision_state_dict  # noqa: E402
from arvision.objectives.param_groups import weight_decay_groups  # noqa: E402

TINY = "nepa_tiny_patch4_32"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def analytic_flops(cfg, batch: int) -> int:
    """Matmul FLOPs of one NEPA forward + backward: backward = 2 x forward, except the patch conv, whose input
    needs no gradient (weight gradient only); attention counted as full T x T."""
    D, L, H = cfg.embed_dim, cfg.depth, cfg.mlp_hidden or 4 * cfg.embed_dim
    N = (cfg.img_size // cfg.patch_size) ** 2
    T = N + 1
    conv = 2 * N * D * cfg.in_chans * cfg.patch_size ** 2
    per_layer = 2 * T * D * 3 * D + 2 * T * D * D + 2 * 2 * T * D * H + 2 * 2 * T * T * D
    return batch * (2 * conv + 3 * L * per_layer)


def test_flop_count_matches_analytic():
    model, _ = bp.build_pair(TINY)
    counted = bp.arvision_flops(model, 4)
    expected = analytic_flops(model.config, 4)
    assert abs(counted - expected) / expected < 0.15, (counted, expected)
    assert bp.arvision_flops(model, 8) == 2 * counted


def _grads(module):
    return {k: p.grad for k, p in module.named_parameters()}


def random_pair(**overrides):
    """build_pair, then the same random weights (LayerScale ~1 included, so that the blocks matter) on both sides."""
    model, official = bp.build_pair(TINY, **overrides)
    official_like.ref.randomize_(official, seed=3)
    model.load_state_dict(official_to_arvision_state_dict(official.state_dict(), model.config))
    return model, official


@pytest.mark.parametrize("training", [True, False])
def test_official_like_same_loss_and_grads(training):
    model, official = random_pair()
    arv, off = bp.ArvisionStep(model, "fp32"), bp.OfficialStep(official, "fp32")
    model.train(training), official.train(training)
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)  # the same RoPE rescale draw on both sides in training mode
    loss_a = arv.loss(images)
    torch.manual_seed(5)
    loss_o = off.loss(images)
    torch.testing.assert_close(loss_a, loss_o, rtol=0, atol=1e-5)
    torch.manual_seed(6)
    assert (off.loss(images) != loss_o) == training  # the rescale draw matters, so the seeding above is meaningful
    loss_a.backward()
    loss_o.backward()
    grads = official_to_arvision_state_dict(_grads(official), model.config)
    mine = _grads(model)
    assert set(grads) == set(mine)
    for k in mine:
        torch.testing.assert_close(mine[k], grads[k], rtol=1e-3, atol=1e-5, msg=k)


def test_bf16_losses_agree():
    model, official = random_pair()
    images = torch.randn(2, 3, 32, 32)
    losses = {}
    for precision in ("fp32", "bf16"):
        steps = {"arvision": bp.ArvisionStep(model, precision), "official": bp.OfficialStep(official, precision)}
        for name, step in steps.items():
            torch.manual_seed(1)
            losses[name, precision] = step.loss(images).item()
    assert abs(losses["arvision", "bf16"] - losses["official", "bf16"]) < 1e-3
    for name in ("arvision", "official"):  # autocast is active on both sides
        assert losses[name, "bf16"] != losses[name, "fp32"]


def test_same_weight_decay_groups():
    model, official = bp.build_pair(TINY)
    names = {id(p): n for n, p in official.named_parameters()}
    off_decay = {names[id(p)]: p for p in official_param_groups(official, 0.05)[0]["params"]}
    off_decay = set(official_to_arvision_state_dict(off_decay, model.config))
    arv_names = {id(p): n for n, p in model.named_parameters()}
    arv_decay = {arv_names[id(p)] for p in weight_decay_groups(model, 1e-4, 0.05, 10)[0]["params"]}
    assert arv_decay == off_decay
    assert {"cls_token", "blocks.0.attn.qkv.weight"} <= arv_decay and "blocks.0.ls1.gamma" not in arv_decay


def test_qk_joint_experiment_is_exact():
    model, _ = random_pair(rope_rescale=None)
    images = torch.randn(2, 3, 32, 32)
    ref = bp.ArvisionStep(model, "fp32").loss(images)
    with bp.experiment("qk-joint"):
        patched = bp.ArvisionStep(model, "fp32").loss(images)
    torch.testing.assert_close(patched, ref, rtol=0, atol=1e-5)
    assert bp.arv_layers.Attention.forward is bp._ORIGINAL_ATTN_FORWARD


def test_measuring_both_sides():
    peaks = {"fp32": 1e11, "bf16": 1e11}
    rows = bp.benchmark_config(TINY, "fp32", 2, torch.device("cpu"), steps=1, repeats=2, warmup=1,
                               compile_modes=[False], adamw=[], experiments=[], ema=True, peaks=peaks)
    assert [r["side"] for r in rows] == ["official", "arvision"]
    assert rows[0]["ratio_vs_official"] == 1.0
    flops = bp.arvision_flops(bp.build_pair(TINY)[0], 2)
    for r in rows:
        assert len(r["windows_s"]) == 2 and all(w > 0 for w in r["windows_s"])
        assert math.isclose(r["img_per_s"], 2 / statistics.median(r["windows_s"]))
        assert r["flops_per_step"] == flops
        assert math.isclose(r["mfu_measured_peak"], r["achieved_flops"] / 1e11)
    assert "| official |" in bp.format_table(rows) and "| arvision |" in bp.format_table(rows)


def test_persistent_bytes_counts_params_and_adam_state():
    sides, model = bp.build_sides(TINY, "fp32", torch.device("cpu"), [False], [], [], ema=False, compile_mode=None)
    images = torch.randn(2, 3, 32, 32)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    for side in sides:
        side.step(images)  # creates the AdamW state (exp_avg, exp_avg_sq)
        assert param_bytes * 3 <= bp.persistent_bytes(side.step) < param_bytes * 3.1


def test_cli_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    rows = bp.main(["--models", TINY, "--precision", "fp32", "--batch-size", "2", "--steps", "1", "--repeats", "1",
                    "--warmup", "0", "--device", "cpu", "--adamw", "fused,foreach", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["side"] for r in saved["rows"]] == [r["side"] for r in rows] == [
        "official", "arvision+fused", "arvision+foreach"]
    assert saved["meta"]["peak_flops"]["fp32"] > 0
    with pytest.raises(SystemExit):
        bp.parse_args(["--precision", "fp16"])
