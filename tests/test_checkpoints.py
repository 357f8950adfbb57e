"""Checkpoint formats: official NEPA checkpoints load into arvision with identical outputs (against an independent
re-implementation of the official model), state-dict / config conversions, the arvision format, atomic saves."""
import json
import sys
import types
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from arvision import NepaConfig, NepaViT
from arvision.checkpoints import arvision_format
from arvision.checkpoints import (
    arvision_config_to_official, arvision_to_official_state_dict, convert, export_official, load_model,
    load_weights, matching_preset, official_config_to_arvision, official_to_arvision_state_dict, save_model,
)
from arvision.models.registry import model_config
from arvision.objectives import NepaLossConfig, nepa_loss
from official_reference import build, official_config, randomize_

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, image_size=28,
            patch_size=7)
LABELS = {str(i): f"c{i}" for i in range(5)}
CASES = {
    "base_like": dict(),  # non-affine QK-Norm, LayerScale, GELU, causal
    "affine_swiglu": dict(qk_norm_affine=True, use_gated_mlp=True, hidden_act="silu"),
    "noqk_geglu_nols_bidir": dict(qk_norm=False, use_gated_mlp=True, hidden_act="gelu", layerscale_value=None,
                                  is_causal=False, intermediate_size=256),
    "affine_bias": dict(qk_norm_affine=True, qk_norm_bias=True),
    "cls_avg_bidir": dict(architectures=["ViTNepaForImageClassification"], id2label=LABELS, qk_norm_affine=True,
                          is_causal=False, drop_path_prob=0.1),
    "cls_last_causal_nols": dict(architectures=["ViTNepaForImageClassification"], id2label=LABELS,
                                 add_pooling_layer=False, layerscale_value=None),
}
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_config(name="base_like", **kw):
    return official_config(**{**TINY, **CASES[name], **kw})


def reference(cfg, seed=0):
    return randomize_(build(cfg), seed).eval()


def save_official(ref, directory, weights="model.safetensors", bare=False):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(ref.config))
    sd = (ref.vit_nepa if bare else ref).state_dict()
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / weights))
    else:
        torch.save(sd, directory / weights)
    return directory


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def assert_matches_reference(model, ref, images):
    causal = ref.config["is_causal"]
    with torch.no_grad():
        hidden, clean, attentions = ref.vit_nepa(images)
        torch.testing.assert_close(model.embed(images), clean, **TOL)
        torch.testing.assert_close(model.forward_features(images), hidden, **TOL)
        maps = model.attention_maps(images)
        for i, probs in enumerate(attentions):
            torch.testing.assert_close(maps[i], probs, **TOL)
        if model.config.num_classes:
            torch.testing.assert_close(model(images), ref(images), **TOL)
        else:
            loss = nepa_loss(model, images, NepaLossConfig(causal=causal))
            torch.testing.assert_close(loss, ref(images)[0], **TOL)


# ------------------------------------------------------------------------------------- official equivalence

@pytest.mark.parametrize("case", list(CASES))
def test_official_checkpoint_matches_reference(case, tmp_path, images):
    cfg = tiny_config(case)
    ref = reference(cfg)
    model = load_model(save_official(ref, tmp_path / "official"))
    assert not model.training
    assert model.config.causal == cfg["is_causal"]
    assert model.config.drop_path_rate == cfg["drop_path_prob"]
    assert model.config.num_classes == (5 if "cls" in case else 0)
    assert_matches_reference(model, ref, images)
    if cfg["is_causal"]:  # the reference really is causal: a later patch does not change earlier outputs
        changed = images.clone()
        changed[:, :, -7:, -7:] += 1.0
        with torch.no_grad():
            a, b = ref.vit_nepa(images)[0], ref.vit_nepa(changed)[0]
        torch.testing.assert_close(a[:, :-1], b[:, :-1])
        assert not torch.allclose(a[:, -1], b[:, -1])


def test_train_mode_rope_augmentation_matches_reference(tmp_path, images):
    cfg = tiny_config("affine_swiglu", pos_embed_shift=0.1, pos_embed_jitter=1.3, pos_embed_rescale=2.0)
    ref = reference(cfg)
    model = load_model(save_official(ref, tmp_path / "official"))
    assert (model.config.rope_shift, model.config.rope_jitter, model.config.rope_rescale) == (0.1, 1.3, 2.0)
    ref.train(), model.train()
    with torch.no_grad():
        torch.manual_seed(7)
        expected = ref.vit_nepa(images)[0]
        torch.manual_seed(7)
        got = model.forward_features(images)
        eval_out = model.eval().forward_features(images)
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - eval_out).abs().max() > 1e-3  # the augmentation was active


def test_official_weight_file_variants(tmp_path, images):
    cfg = tiny_config("affine_swiglu")
    ref, ref_ema = reference(cfg, seed=0), reference(cfg, seed=1)
    ref_sd = load_model(save_official(ref, tmp_path / "st")).state_dict()
    for name, directory in [("bin", save_official(ref, tmp_path / "bin", "pytorch_model.bin")),
                            ("bare", save_official(ref, tmp_path / "bare", bare=True))]:
        sd = load_model(directory).state_dict()
        assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd), name
    # sharded safetensors with an index
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text(json.dumps(cfg))
    full = ref.state_dict()
    keys = sorted(full)
    weight_map = {}
    for j, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        fname = f"model-0000{j + 1}-of-00002.safetensors"
        save_file({k: full[k].contiguous() for k in part}, str(shard_dir / fname))
        weight_map.update({k: fname for k in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sd = load_model(shard_dir).state_dict()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    # the pretraining EMA copy
    directory = tmp_path / "st"
    torch.save(ref_ema.state_dict(), directory / "pytorch_model_ema.bin")
    assert_matches_reference(load_model(directory, ema=True), ref_ema, images)
    assert_matches_reference(load_model(directory), ref, images)
    with pytest.raises(FileNotFoundError, match="pytorch_model_ema.bin"):
        load_model(tmp_path / "bin", ema=True)


def test_nonaffine_pretrain_into_affine_finetune_config(tmp_path, images):
    cfg = tiny_config("base_like")
    ref = reference(cfg)
    model = load_model(save_official(ref, tmp_path / "official"), qk_norm="affine", num_classes=5, causal=False,
                       drop_path_rate=0.1)
    for blk in model.blocks:  # filled with ones, as the official init script leaves them
        assert torch.equal(blk.attn.q_norm.weight, torch.ones(32))
        assert torch.equal(blk.attn.k_norm.weight, torch.ones(32))
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert model.config.drop_path_rate == 0.1 and not model.config.causal
    bidir = build(dict(cfg, is_causal=False)).eval()
    bidir.load_state_dict(ref.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), bidir.vit_nepa(images)[0], **TOL)
        assert torch.equal(model(images), torch.zeros(2, 5))
    # the same through load_weights into a model built from a config
    target = NepaViT(replace(official_config_to_arvision(cfg), qk_norm="affine", num_classes=5))
    load_weights(target, tmp_path / "official", skip_head=True)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))


# -------------------------------------------------------------------------------------------- conversions

@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_and_config_round_trips(case):
    cfg = tiny_config(case)
    ref = reference(cfg)
    config = official_config_to_arvision(cfg)
    official = ref.state_dict()
    arv = official_to_arvision_state_dict(official, config)
    assert set(arv) == set(NepaViT(config).state_dict())
    back = arvision_to_official_state_dict(arv, config)
    assert set(back) == set(official) and all(torch.equal(back[k], official[k]) for k in official)
    bare = ref.vit_nepa.state_dict()
    bare_back = arvision_to_official_state_dict(official_to_arvision_state_dict(bare, config), config, prefix="")
    assert set(bare_back) == set(bare) and all(torch.equal(bare_back[k], bare[k]) for k in bare)
    arv2 = official_to_arvision_state_dict(arvision_to_official_state_dict(arv, config), config)
    assert set(arv2) == set(arv) and all(torch.equal(arv2[k], arv[k]) for k in arv)
    assert official_config_to_arvision(arvision_config_to_official(config)) == config


def test_qkv_fusion_order():
    cfg = tiny_config()
    sd = build(cfg).state_dict()
    arv = official_to_arvision_state_dict(sd, cfg)
    pre = "vit_nepa.encoder.layer.1.attention.attention."
    q, k, v = arv["blocks.1.attn.qkv.weight"].chunk(3)
    assert torch.equal(q, sd[pre + "query.weight"]) and torch.equal(k, sd[pre + "key.weight"])
    assert torch.equal(v, sd[pre + "value.weight"])
    assert torch.equal(arv["blocks.1.ls2.gamma"], sd["vit_nepa.encoder.layer.1.output.layer_scale.lambda1"])
    assert torch.equal(arv["blocks.0.mlp.fc1.weight"], sd["vit_nepa.encoder.layer.0.intermediate.up_proj.weight"])


def test_official_config_mapping():
    c = official_config_to_arvision(official_config(hidden_size=64, num_attention_heads=2, intermediate_size=256))
    assert (c.qk_norm, c.mlp_type, c.mlp_hidden, c.layerscale, c.rope_rescale, c.causal) == (
        "layernorm", "gelu", None, 1e-5, 2.0, True)
    assert c.num_classes == 0  # the default 2-label id2label of a pretraining config is not a classifier
    assert official_config_to_arvision(official_config(qk_norm=False, qk_norm_affine=True)).qk_norm == "off"
    c = official_config_to_arvision(official_config(qk_norm_affine=True, qk_norm_bias=True, layerscale_value=None))
    assert (c.qk_norm, c.qk_norm_bias, c.layerscale) == ("affine", True, None)
    assert official_config_to_arvision(official_config(use_gated_mlp=True, hidden_act="silu")).mlp_type == "swiglu"
    assert official_config_to_arvision(official_config(use_gated_mlp=True)).mlp_type == "geglu"
    c = official_config_to_arvision(official_config(architectures=["ViTNepaForImageClassification"],
                                                    id2label={str(i): str(i) for i in range(1000)},
                                                    add_pooling_layer=False, is_causal=False, drop_path_prob=0.2))
    assert (c.num_classes, c.global_pool, c.causal, c.drop_path_rate) == (1000, "last", False, 0.2)
    for bad in (dict(hidden_act="silu"), dict(hidden_act="gelu_new"), dict(use_gated_mlp=True, hidden_act="relu")):
        with pytest.raises(ValueError, match="hidden_act"):
            official_config_to_arvision(official_config(**bad))
    assert matching_preset(official_config_to_arvision(official_config())) == "nepa_base_patch14_224"


def _count(config: NepaConfig) -> int:
    """Parameters of a full-depth model, counted from 0- and 1-block models (the blocks are identical)."""
    n0 = sum(p.numel() for p in NepaViT(replace(config, depth=0)).parameters())
    n1 = sum(p.numel() for p in NepaViT(replace(config, depth=1)).parameters())
    return n0 + config.depth * (n1 - n0)


def test_official_parameter_counts():
    base = official_config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           qk_norm_affine=False)
    large = official_config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                            qk_norm_affine=True)
    assert _count(official_config_to_arvision(base)) == 85_527_552
    assert _count(official_config_to_arvision(large)) == 302_967_808
    base_cls = dict(base, qk_norm_affine=True, architectures=["ViTNepaForImageClassification"],
                    id2label={str(i): str(i) for i in range(1000)}, is_causal=False, drop_path_prob=0.1)
    assert _count(official_config_to_arvision(base_cls)) == 86_299_624
    assert official_config_to_arvision(base) == model_config("nepa_base_patch14_224")
    assert official_config_to_arvision(large) == model_config("nepa_large_patch14_224")


# ---------------------------------------------------------------------------------------- arvision format

def test_convert_and_export(tmp_path, images):
    cfg = tiny_config("cls_avg_bidir")
    src = save_official(reference(cfg), tmp_path / "official")
    original = load_model(src)
    out = convert(src, tmp_path / "converted")
    meta = json.loads((out / "arvision.json").read_text())
    assert meta == {"format": "arvision", "format_version": 2, "family": "nepa_vit",
                    "model": original.config.to_dict(), "preset": None}
    converted = load_model(out)
    with torch.no_grad():
        assert torch.equal(converted(images), original(images))
        assert torch.equal(converted.forward_features(images), original.forward_features(images))
    exported = export_official(converted, tmp_path / "exported")
    assert json.loads((exported / "config.json").read_text())["id2label"] == {str(i): f"LABEL_{i}" for i in range(5)}
    sd = load_file(str(exported / "model.safetensors"))
    ref_sd = load_file(str(src / "model.safetensors"))
    assert set(sd) == set(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)


def test_save_load_round_trip(tmp_path, images):
    torch.manual_seed(0)
    model = NepaViT(official_config_to_arvision(tiny_config("affine_swiglu")))
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    d = save_model(model, tmp_path / "ckpt", ema_state_dict=ema, preset="nepa_tiny_patch4_32")
    assert sorted(p.name for p in d.iterdir()) == ["arvision.json", "ema.safetensors", "model.safetensors"]
    assert json.loads((d / "arvision.json").read_text())["preset"] == "nepa_tiny_patch4_32"
    for loaded, expected in [(load_model(d), model.state_dict()), (load_model(d, ema=True), ema),
                             (load_model(d / "model.safetensors"), model.state_dict())]:
        sd = loaded.state_dict()
        assert set(sd) == set(expected) and all(torch.equal(sd[k], expected[k]) for k in sd)
    assert load_model(d).config == model.config
    assert load_model(d, causal=False, rope_rescale=None).config == replace(model.config, causal=False,
                                                                           rope_rescale=None)
    (d / "state.pt").write_bytes(b"trainer state is ignored")
    assert torch.equal(load_model(d).patch_embed.weight, model.patch_embed.weight)
    save_model(model, tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="without EMA"):
        load_model(tmp_path / "plain", ema=True)
    with pytest.raises(ValueError, match="unknown config keys"):
        load_model(d, not_a_field=1)


def test_wrong_architecture_gives_one_line_error(tmp_path):
    cfg = tiny_config("base_like")
    src = save_official(reference(cfg), tmp_path / "official")
    deeper = NepaViT(replace(official_config_to_arvision(cfg), depth=3, mlp_hidden=128))
    with pytest.raises(ValueError) as err:
        load_weights(deeper, src)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing keys blocks.2." in msg and "(+" in msg  # the 3rd block: more than 5 keys, counted
    assert "blocks.0.mlp.fc1.weight (96, 64) in checkpoint vs (128, 64) in model" in msg
    assert "preset" in msg
    # a config.json that does not describe its weights
    (src / "config.json").write_text(json.dumps(dict(cfg, hidden_size=96, num_attention_heads=3)))
    with pytest.raises(ValueError, match="shape mismatches .*patch_embed.weight"):
        load_model(src)
    # another model's weights entirely
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(cfg))
    save_file({"pos_embed": torch.zeros(1, 17, 64), "head.weight": torch.zeros(10, 64)},
              str(other / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys (pos_embed, head.weight|head.weight, pos_embed)"):
        load_model(other)


def test_missing_sources(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "no" / "such" / "dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither arvision.json"):
        load_model(tmp_path / "empty")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'arvision\[hf\]'.*download the folder"):
        load_model("SixAILab/nepa-base-patch14-224")


def test_hub_download(tmp_path, monkeypatch, images):
    ref = reference(tiny_config("base_like"))
    local = save_official(ref, tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(local)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    model = load_model("SixAILab/nepa-base-patch14-224@init")
    assert calls == [("SixAILab/nepa-base-patch14-224", "init", ["*.json", "*.safetensors"])]
    assert_matches_reference(model, ref, images)

    def offline(*args, **kwargs):
        raise ConnectionError("Name or service not known\nmore detail")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(OSError, match="Hugging Face Hub failed .*Name or service not known.*download the folder"):
        load_model("SixAILab/nepa-base-patch14-224")


def test_atomic_save(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = official_config_to_arvision(tiny_config())
    first, second = NepaViT(cfg), NepaViT(cfg)
    target = save_model(first, tmp_path / "ckpt")
    real_save = arvision_format.save_file

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(arvision_format, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_model(second, target)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert torch.equal(load_model(target).patch_embed.weight, first.patch_embed.weight)
    with pytest.raises(OSError):  # a failure on a fresh path leaves nothing behind either
        save_model(second, tmp_path / "fresh")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]

    monkeypatch.setattr(arvision_format, "save_file", real_save)
    save_model(second, target, extra_files=lambda d: (d / "state.pt").write_bytes(b"x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (target / "state.pt").read_bytes() == b"x"
    assert torch.equal(load_model(target).patch_embed.weight, second.patch_embed.weight)


def test_mask_token_survives_official_export(tmp_path):
    torch.manual_seed(0)
    model = NepaViT(replace(official_config_to_arvision(tiny_config()), use_mask_token=True))
    with torch.no_grad():
        model.mask_token.normal_()
    loaded = load_model(export_official(model, tmp_path / "exported"))
    assert loaded.config == model.config
    assert torch.equal(loaded.mask_token, model.mask_token)
