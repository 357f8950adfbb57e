"""The shared transformer trunk: attention modes (causal, explicit masks), the KV cache with position offsets,
RoPE on other grids, and the one block-selection grammar."""
import pytest
import torch

import arvision
from arvision.models.layers import Block, offset_causal_mask
from arvision.models.rope import Rope2D
from arvision.models.transformer import Transformer, parse_blocks
from arvision.models.vit import NepaViT


def trunk(**kw):
    torch.manual_seed(0)
    args = dict(dim=64, depth=3, num_heads=4, qk_norm="affine", layerscale=0.5)
    args.update(kw)
    return Transformer(**args).eval()


def rope_for(grid=(3, 4), prefix=1):
    return Rope2D(16, grid, num_prefix_tokens=prefix).eval()(torch.float32)


def test_parse_blocks_grammar():
    assert parse_blocks(None, 4) == [0, 1, 2, 3]
    assert parse_blocks(2, 4) == [2]
    assert parse_blocks(-1, 4) == [3]
    assert parse_blocks("3,-3,5", 6) == [3, 5]  # the crash: a repeat (3 == -3 of 6) is dropped
    assert parse_blocks("-2:", 6) == [4, 5]
    assert parse_blocks("1:3, 0", 6) == [1, 2, 0]
    assert parse_blocks("middle", 12) == [6] and parse_blocks("last", 12) == [11] and parse_blocks("all", 2) == [0, 1]
    assert parse_blocks([0, -1], 3) == [0, 2]
    with pytest.raises(ValueError, match="block 6 is out of range for a model with 6 blocks"):
        parse_blocks("3,6", 6)
    with pytest.raises(ValueError, match="cannot read"):
        parse_blocks("three", 6)
    with pytest.raises(ValueError, match="select no block"):
        parse_blocks("4:2", 6)


def test_kv_cache_decoding_equals_full_causal_forward():
    model = trunk()
    x = torch.randn(2, 13, 64)  # 1 prefix token + a 3x4 grid
    cos, sin = rope_for()
    full = model.forward_trunk(x, (cos, sin), causal=True)
    cache = model.new_kv_cache(batch_size=2, max_len=13)
    outs, t = [], 0
    for n in (3, 1, 2, 1, 1, 5):  # a prefill, single steps, and chunks after cached positions
        outs.append(model.forward_trunk(x[:, t:t + n], (cos[t:t + n], sin[t:t + n]), causal=True, kv_cache=cache))
        t += n
    assert cache.length == 13
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache holds 13 positions"):
        model.forward_trunk(x[:, :1], (cos[:1], sin[:1]), causal=True, kv_cache=cache)
    cache.reset()
    torch.testing.assert_close(model.forward_trunk(x[:, :4], (cos[:4], sin[:4]), causal=True, kv_cache=cache),
                               full[:, :4], atol=1e-5, rtol=1e-5)


def test_causality_and_explicit_masks():
    model = trunk()
    x = torch.randn(1, 10, 64)
    y = x.clone()
    y[:, 6] += torch.randn(64)  # not a constant: LayerNorm would remove it
    a, b = model.forward_trunk(x, causal=True), model.forward_trunk(y, causal=True)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)  # changing token 6 changes nothing before it
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    # an explicit lower-triangular mask is the causal mode; an all-true mask the bidirectional one
    tri = offset_causal_mask(10, 10)
    torch.testing.assert_close(model.forward_trunk(x, attn_mask=tri), a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.forward_trunk(x, attn_mask=torch.ones(10, 10, dtype=torch.bool)),
                               model.forward_trunk(x, causal=False), atol=1e-6, rtol=1e-6)
    # prefix-LM: the first 4 tokens see each other, the rest are causal
    prefix = tri.clone()
    prefix[:4, :4] = True
    out = model.forward_trunk(y, attn_mask=prefix)
    base = model.forward_trunk(x, attn_mask=prefix)
    torch.testing.assert_close(out[:, :6], base[:, :6], atol=0, rtol=0)
    z = x.clone()
    z[:, 3] += torch.randn(64)
    assert not torch.allclose(model.forward_trunk(z, attn_mask=prefix)[:, 0], base[:, 0])  # 0 sees 3


def test_eager_attention_and_checkpointing_honour_masks():
    model = trunk()
    x = torch.randn(2, 9, 64)
    mask = torch.rand(9, 9) > 0.4
    mask |= torch.eye(9, dtype=torch.bool)
    probs = model.attention_probs(x, "all", attn_mask=mask)
    for p in probs.values():
        assert torch.all(p[..., ~mask] == 0)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 9))
    ref = model.forward_trunk(x, attn_mask=mask)
    model.train().set_grad_checkpointing(True)
    out = model.forward_trunk(x.requires_grad_(), attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert x.grad is not None


def test_vit_on_larger_and_non_square_inputs():
    model = arvision.create_model("nepa_tiny_patch4_32").eval()
    x = torch.randn(2, 3, 48, 32)
    feats = model.forward_features(x, causal=False)
    assert feats.shape == (2, 1 + 12 * 8, 192) and feats.isfinite().all()
    grids = model.forward_intermediates(x, indices=2, intermediates_only=True, causal=False)
    assert [g.shape for g in grids] == [(2, 192, 12, 8)] * 2
    # the default-size path is unchanged by the grid argument
    x32 = torch.randn(1, 3, 32, 32)
    tokens = model.embed(x32)
    torch.testing.assert_close(model.forward_tokens(tokens, grid=(8, 8)), model.forward_features(x32))
    with pytest.raises(ValueError, match="do not match 1 CLS"):
        model.forward_tokens(model.embed(x))


def test_trunk_is_built_with_keywords_only():
    with pytest.raises(TypeError):
        Transformer(64, 3, 4)  # noqa: the 12-positional-argument construction is gone
    model = trunk(depth=2, final_norm=False)
    assert len(model.blocks) == 2 and isinstance(model.norm, torch.nn.Identity)


class CountingBlock(Block):
    calls = 0

    def forward(self, *args, **kwargs):
        CountingBlock.calls += 1
        return super().forward(*args, **kwargs)


def test_block_fn_and_mlp_layer_hooks():
    from timm.layers import GluMlp, Mlp

    CountingBlock.calls = 0
    model = trunk(block_fn=CountingBlock, mlp_layer=GluMlp)
    assert all(isinstance(b, CountingBlock) and isinstance(b.mlp, GluMlp) for b in model.blocks)
    model.forward_trunk(torch.randn(1, 5, 64), causal=True)
    assert CountingBlock.calls == 3
    # a family passes the hooks through: timm's Mlp is the default GELU MLP, so the same seed gives the same model
    torch.manual_seed(0)
    plain = arvision.create_model("nepa_tiny_patch4_32", depth=2)
    torch.manual_seed(0)
    hooked = NepaViT(plain.config, block_fn=CountingBlock, mlp_layer=Mlp)
    assert isinstance(hooked.blocks[0], CountingBlock) and type(hooked.blocks[0].mlp) is Mlp
    assert list(hooked.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(hooked.state_dict().values(), plain.state_dict().values()))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(hooked.eval().forward_features(x), plain.eval().forward_features(x), atol=0, rtol=0)


def test_vit_keeps_the_official_parameter_order():
    """Inputs, then the blocks, then the final norm and the classifier: the order the official model registers its
    parameters in (the init draws follow it), kept while the trunk is built by ``Transformer.__init__``."""
    model = arvision.create_model("nepa_tiny_patch4_32", depth=2, num_classes=3, use_mask_token=True)
    keys = list(model.state_dict())
    assert keys[:4] == ["cls_token", "mask_token", "patch_embed.weight", "patch_embed.bias"]
    assert keys[4].startswith("blocks.0.") and keys[-6:] == ["norm.weight", "norm.bias", "fc_norm.weight",
                                                            "fc_norm.bias", "head.weight", "head.bias"]
    segmentor = arvision.create_model("upernet_nepa_tiny_patch4_32")
    assert not hasattr(segmentor, "blocks")  # a model holding a model reaches its blocks through it
