import inspect

import pytest
import torch

import arvision


def tiny(**kw):
    args = dict(depth=3, rope_rescale=None)
    args.update(kw)
    return arvision.create_model("nepa_tiny_patch4_32", **args)


def test_official_parameter_counts():
    with torch.device("meta"):
        assert sum(p.numel() for p in arvision.create_model("nepa_base_patch14_224").parameters()) == 85_527_552
        assert sum(p.numel() for p in arvision.create_model("nepa_large_patch14_224").parameters()) == 302_967_808
        cls = arvision.create_model("nepa_base_patch14_224", num_classes=1000, qk_norm="affine")
        assert sum(p.numel() for p in cls.parameters()) == 86_299_624


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_causal_property(grad_ckpt):
    model = tiny(layerscale=None)  # full-strength residual branches, so any leak would show
    model.set_grad_checkpointing(grad_ckpt)
    model.train()  # checkpointing is active only with grad enabled in train mode
    x = torch.randn(2, 3, 32, 32)
    x2 = x.clone()
    x2[:, :, 16:20, 8:12] += 1.0  # patch row 4, col 2 -> patch index 34, token 35
    out1, out2 = model.forward_features(x), model.forward_features(x2)
    t = 1 + 4 * 8 + 2
    torch.testing.assert_close(out1[:, :t], out2[:, :t], atol=0, rtol=0)
    assert (out1[:, t + 1:] - out2[:, t + 1:]).abs().amax() > 1e-3  # later tokens do see it
    bi1, bi2 = model.forward_features(x, causal=False), model.forward_features(x2, causal=False)
    assert (bi1[:, :t] - bi2[:, :t]).abs().amax() > 1e-3  # bidirectional: earlier tokens see it


def test_grad_checkpointing_matches_plain_forward_and_backward():
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        loss = arvision.nepa_loss(model, x)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_eager_attention_matches_sdpa(causal):
    model = tiny(qk_norm="affine").eval()
    for blk in model.blocks:
        torch.nn.init.normal_(blk.attn.q_norm.weight, 1.0, 0.2)
    x = torch.randn(2, 3, 32, 32)
    h = model.embed(x)
    rope = model.rope()
    for blk in model.blocks:
        fast = blk(h, rope, causal)
        eager, probs = blk(h, rope, causal, return_attn=True)
        torch.testing.assert_close(fast, eager, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
        if causal:
            assert probs.triu(1).abs().max() == 0
        h = fast


def test_forward_api_shapes_and_errors():
    model = tiny(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.embed(x).shape == (2, 65, 192)
    feats = model.forward_features(x)
    assert feats.shape == (2, 65, 192)
    assert model(x).shape == (2, 10)
    assert torch.equal(model(x), torch.zeros(2, 10))  # zero-initialised head
    final, inter = model.forward_intermediates(x, indices=[0, -1], return_prefix_tokens=True, output_fmt="NLC")
    torch.testing.assert_close(final, feats)
    torch.testing.assert_close(model.norm(torch.cat(inter[1][::-1], dim=1)), feats)
    grids = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [g.shape for g in grids] == [(2, 192, 8, 8)] * 2
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[3])
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        model.embed(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="unknown model"):
        arvision.create_model("nepa_huge")
    with pytest.raises(ValueError, match="unknown config keys"):
        arvision.create_model("nepa_tiny_patch4_32", dropout=0.1)


@pytest.mark.parametrize("mlp_type", ["gelu", "swiglu", "geglu"])
def test_mlp_variants_and_layerscale_off(mlp_type):
    model = tiny(mlp_type=mlp_type, layerscale=None, qk_norm="off")
    names = {n for n, _ in model.named_parameters()}
    assert ("blocks.0.mlp.fc1_g.weight" in names) == (mlp_type != "gelu")
    assert not any("ls1" in n for n in names)
    assert model.forward_features(torch.randn(1, 3, 32, 32)).isfinite().all()


@pytest.mark.slow
def test_compiled_model_keeps_causal_mask():
    model = tiny(layerscale=None).eval()
    compiled = torch.compile(model.forward_features)
    x = torch.randn(1, 3, 32, 32)
    x2 = x.clone()
    x2[:, :, 28:, 28:] += 1.0  # last patch
    out1, out2 = compiled(x), compiled(x2)
    torch.testing.assert_close(out1, model.forward_features(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out1[:, :-1], out2[:, :-1], atol=1e-6, rtol=0)


def test_forward_intermediates_keeps_timms_meaning():
    from timm.models.vision_transformer import VisionTransformer

    ours = inspect.signature(arvision.models.vit.NepaViT.forward_intermediates).parameters
    theirs = inspect.signature(VisionTransformer.forward_intermediates).parameters
    for name in ("indices", "return_prefix_tokens", "norm", "stop_early", "output_fmt", "intermediates_only"):
        assert ours[name].default == theirs[name].default, name
    model = tiny().eval()  # 3 blocks
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        nlc = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)  # None: every block
        last_two = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
        asked_backwards = model.forward_intermediates(x, indices=[-1, 1], output_fmt="NLC", intermediates_only=True)
        grids = model.forward_intermediates(x, intermediates_only=True)
        final, one = model.forward_intermediates(x, indices=[0])
        early, _ = model.forward_intermediates(x, indices=[0], stop_early=True)
    assert len(nlc) == 3 and [t.shape for t in nlc] == [(2, 64, 192)] * 3  # the CLS token is split off
    assert len(last_two) == 2 and all(torch.equal(a, b) for a, b in zip(last_two, nlc[1:]))  # an int: the last n
    assert all(torch.equal(a, b) for a, b in zip(asked_backwards, nlc[1:]))  # block order
    assert [g.shape for g in grids] == [(2, 192, 8, 8)] * 3  # NCHW by default
    torch.testing.assert_close(grids[0], nlc[0].transpose(1, 2).reshape(2, 192, 8, 8), atol=0, rtol=0)
    torch.testing.assert_close(final, model.forward_features(x))  # (final, intermediates), all blocks run
    assert torch.equal(one[0], grids[0]) and not torch.allclose(early, final)
    for bad, match in ((0, "last 0 blocks"), (4, "last 4 blocks"), ("-2:", "parse_blocks")):
        with pytest.raises(ValueError, match=match):
            model.forward_intermediates(x, indices=bad)


def test_global_pool_names_are_not_timms_token():
    with pytest.raises(ValueError, match="timm's 'token'"):
        tiny(num_classes=10, global_pool="token")
    model = tiny(num_classes=10, global_pool="last").eval()
    model.head.weight.data.normal_()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model.head(model.forward_features(x)[:, -1]))
