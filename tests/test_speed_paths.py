"""The fast paths of the training step give the results of the plain ones: the matmul attention path equals SDPA,
the fused RoPE equals the textbook one, the trainer's gradient clipping equals torch's, uint8 batches normalised on
the device equal the float transform, the trainer reads metrics from the device only every log_every steps, and DDP
skips buffer broadcasts only for models whose buffers are constants."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import arvision
from arvision.config import load_config
from arvision.data import SyntheticShapes, pretrain_transform
from arvision.data.transforms import normalize_uint8
from arvision.models import layers
from arvision.objectives import NepaObjective
from arvision.train import distributed
from arvision.train.distributed import DistEnv, clip_grad_norm, has_state_buffers
from arvision.train.engine import Trainer


def _qkv(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
def test_matmul_attention_equals_sdpa(causal, bf16):
    q, k, v = _qkv((2, 3, 65, 16))
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        with layers.attention_kernel("matmul"):
            out = layers.attention(q, k, v, is_causal=causal)
        assert layers.set_attention_kernel("auto") == "auto"  # restored after the block
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
    assert out.dtype == ref.dtype == (torch.bfloat16 if bf16 else torch.float32)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    grad = torch.randn(out.shape)
    (out.float() * grad).sum().backward()
    (ref.float() * grad).sum().backward()
    for a, b in ((q, qs), (k, ks), (v, vs)):
        torch.testing.assert_close(a.grad, b.grad, **tol)
    if causal:  # the last query sees every key, the first only itself
        assert torch.allclose(out[:, :, 0].float(), v[:, :, 0].float(), atol=tol["atol"])


def test_attention_kernel_choice():
    assert layers.set_attention_kernel("auto") == "auto"
    with pytest.raises(ValueError, match="attention kernel"):
        layers.set_attention_kernel("flash")
    # an explicit mask always goes to SDPA (equal results either way)
    q, k, v = (t.detach() for t in _qkv((1, 2, 5, 8)))
    mask = torch.rand(5, 5) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(layers.attention(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_model_outputs_do_not_depend_on_the_attention_kernel():
    torch.manual_seed(0)
    model = arvision.create_model("nepa_tiny_patch4_32", depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    out = {}
    for kernel in ("sdpa", "matmul"):
        previous = layers.set_attention_kernel(kernel)
        try:
            out[kernel] = model.forward_features(x)
        finally:
            layers.set_attention_kernel(previous)
    torch.testing.assert_close(out["sdpa"], out["matmul"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_norm", [None, 0.5, 1e6])
def test_clip_grad_norm_equals_torch(max_norm):
    torch.manual_seed(0)
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(16, 8)
    for m in (a, b):
        (m(x) ** 2).sum().backward()
    norm = clip_grad_norm(a.parameters(), max_norm)
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm or float("inf"))
    torch.testing.assert_close(norm, ref)
    for p, r in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, r.grad)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in a.parameters()])
    if max_norm == 0.5:
        assert norm > 1 and clipped == pytest.approx(0.5, rel=1e-4)  # clipping happened
    else:
        assert clipped == pytest.approx(norm.item(), rel=1e-6)


def test_uint8_batches_normalised_on_the_device_equal_the_float_transform():
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
              for h, w in ((40, 48), (32, 32), (64, 36))]
    float_tf, uint8_tf = pretrain_transform(32), pretrain_transform(32, uint8=True)
    for seed, img in enumerate(images):
        torch.manual_seed(seed)
        ref = float_tf(img)
        torch.manual_seed(seed)
        raw = uint8_tf(img)
        assert raw.dtype == torch.uint8 and raw.shape == ref.shape == (3, 32, 32)
        assert torch.equal(normalize_uint8(raw[None])[0], ref)  # bitwise: same ops, same order
    with pytest.raises(ValueError, match="uint8"):
        normalize_uint8(ref)


def test_nepa_objective_normalises_uint8_inputs():
    torch.manual_seed(0)
    obj = NepaObjective(arvision.create_model("nepa_tiny_patch4_32", depth=1, rope_rescale=None))
    raw = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    loss_u8, m_u8 = obj(raw)
    loss_f, m_f = obj(raw.float() / 255 * 2 - 1)
    torch.testing.assert_close(loss_u8, loss_f, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m_u8["pred_std"], m_f["pred_std"], atol=1e-6, rtol=1e-6)


def test_trainer_reads_metrics_only_every_log_every_steps(tmp_path, monkeypatch):
    reads = []
    real = distributed.all_reduce_mean

    def counting(t):
        reads.append(t.shape)
        return real(t)
    monkeypatch.setattr("arvision.train.engine.all_reduce_mean", counting)
    torch.manual_seed(0)
    model = arvision.create_model("nepa_tiny_patch4_32", depth=1)
    data = SyntheticShapes(num_samples=64, split="train", transform=pretrain_transform(32, uint8=True))
    cfg = load_config("pretrain", overrides=["train.max_steps=6", "train.batch_size=8", "train.log_every=3",
                                             "train.ckpt_every=0", "train.precision=fp32"]).train
    Trainer(NepaObjective(model), data, cfg, tmp_path, DistEnv(), num_workers=0).fit()
    assert len(reads) == 2 and all(s == (3,) for s in reads)  # loss, pred_std, grad_norm in one reduction
    rows = [json.loads(x) for x in (Path(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    assert all(-1 <= r["loss"] <= 1 and r["grad_norm"] > 0 for r in train)


class _WithStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


def test_ddp_broadcasts_only_state_buffers():
    assert not has_state_buffers(arvision.create_model("nepa_tiny_patch4_32", depth=1))  # RoPE frequencies only
    assert has_state_buffers(_WithStats())  # BatchNorm running statistics
