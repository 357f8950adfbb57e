"""Tokenizers: published layouts and loaders against an independent re-implementation, shapes of every preset,
training behaviour (overfitting, dead-code restarts), losses, and arvision save / load."""
from __future__ import annotations

import pytest
import torch

import reference_tokenizers as ref
from arvision.checkpoints import load_tokenizer
from arvision.models import create_model, list_models, model_config
from arvision.models.tokenizers import (
    DeadCodeRestart, KLConfig, KLTokenizer, VectorQuantizer, VQConfig, VQTokenizer, kl_config_from_state_dict,
    perplexity, vq_config_from_state_dict,
)


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta(keys: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in keys.items()}


def _images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------- published layouts

def test_vq16_preset_has_the_published_keys_and_shapes():
    with torch.device("meta"):
        model = create_model("llamagen_vq16")
    assert _shapes(model) == ref.llamagen_vq_keys()
    assert vq_config_from_state_dict(_meta(ref.llamagen_vq_keys())) == model_config("llamagen_vq16")


def test_kl16_preset_has_the_published_keys_and_shapes():
    with torch.device("meta"):
        model = create_model("mar_kl16")
    assert _shapes(model) == ref.mar_kl_keys()
    cfg = kl_config_from_state_dict(_meta(ref.mar_kl_keys()))
    assert cfg == model_config("mar_kl16") and cfg.scale_factor == 0.2325


SMALL_VQ = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=32, codebook_size=64, embed_dim=8)


def test_llamagen_file_loads_and_matches_the_reference(tmp_path):
    sd = ref.random_state_dict(ref.llamagen_vq_keys(**SMALL_VQ), seed=1)
    path = tmp_path / "vq_ds4_c2i.pt"
    torch.save({"model": sd}, path)
    tok = load_tokenizer(path)
    assert isinstance(tok, VQTokenizer) and tok.token_type == "discrete" and not tok.training
    assert tok.codebook_size == 64 and tok.latent_channels == 8 and tok.grid_size(16) == 4 and tok.scale_factor == 1.0
    x = _images()
    with torch.no_grad():
        codes = tok.encode(x)
        expect = ref.vq_encode(sd, x)
        assert codes.dtype == torch.long and codes.shape == (2, 4, 4)
        assert torch.equal(codes, expect)
        assert len(codes.unique()) > 1  # a degenerate all-equal code map would not test the lookup
        torch.testing.assert_close(tok.decode(codes), ref.vq_decode(sd, expect), rtol=1e-5, atol=1e-5)


def test_mar_file_loads_and_matches_the_reference(tmp_path):
    keys = ref.mar_kl_keys(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, embed_dim=4, resolution=64)
    assert any(".down.2.attn." in k for k in keys) and not any(".up.2.attn." in k for k in keys)
    sd = ref.random_state_dict(keys, seed=2)
    extra = {"loss.discriminator.main.0.weight": torch.zeros(2)}  # training-only keys MAR's loader skips
    path = tmp_path / "kl4.ckpt"
    torch.save({"model": {**sd, **extra}}, path)
    tok = load_tokenizer(path)
    assert isinstance(tok, KLTokenizer) and tok.token_type == "continuous" and tok.codebook_size is None
    assert tok.latent_channels == 4 and tok.scale_factor == 1.0
    x = _images(seed=3)
    with torch.no_grad():
        mean = tok.encode(x)
        assert mean.shape == (2, 4, 4, 4)
        torch.testing.assert_close(mean, ref.kl_encode(sd, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tok.decode(mean), ref.kl_decode(sd, mean), rtol=1e-5, atol=1e-5)
    assert load_tokenizer(path, scale_factor=0.5).scale_factor == 0.5


def test_published_loader_errors(tmp_path):
    sd = ref.random_state_dict(ref.llamagen_vq_keys(**SMALL_VQ), seed=1)
    bad = dict(sd)
    del bad["decoder.conv_out.bias"]
    torch.save({"model": bad}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing.*decoder.conv_out.bias"):
        load_tokenizer(tmp_path / "missing.pt")
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a LlamaGen VQ tokenizer"):
        load_tokenizer(tmp_path / "other.pt")
    torch.save({"model": sd, "junk": _Pickled()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_tokenizer(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError, match="vq_ds16_c2i.pt"):
        load_tokenizer(tmp_path / "absent.pt")


class _Pickled:
    pass


# ------------------------------------------------------------------------------- presets and configs

@pytest.mark.parametrize("name", list_models("vq_tokenizer") + list_models("kl_tokenizer"))
def test_every_preset_encodes_and_decodes(name):
    tok = create_model(name).eval()
    s = tok.downsample
    x = _images(n=2, size=2 * s)
    with torch.no_grad():
        tokens = tok.encode(x)
        if tok.token_type == "discrete":
            assert tokens.shape == (2, 2, 2) and tokens.dtype == torch.long
            assert int(tokens.max()) < tok.codebook_size
        else:
            assert tokens.shape == (2, tok.latent_channels, 2, 2)
        assert tok.decode(tokens).shape == x.shape
    assert tok.grid_size(32 * s) == 32
    with pytest.raises(ValueError, match="multiple of the tokenizer's stride"):
        tok.grid_size(3 * s + 1)


def test_small_presets_give_an_8x8_grid_on_cifar():
    for name in ("vq_f4_32px", "kl_f4_32px"):
        assert create_model(name).grid_size(32) == 8


def test_config_round_trip_and_bad_keys():
    cfg = model_config("vq_f4_32px")
    assert VQConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config keys \\['codebook'\\] for VQConfig"):
        VQConfig.from_dict({"codebook": 3})
    with pytest.raises(ValueError, match="multiples of 32"):
        KLConfig(ch=48)


def test_arvision_directory_round_trip(tmp_path):
    from arvision.checkpoints import load_model, save_model
    for name in ("vq_f4_32px", "kl_f4_32px"):
        tok = create_model(name, ch=32).eval()
        save_model(tok, tmp_path / name, preset=name)
        back = load_tokenizer(tmp_path / name)
        assert type(back) is type(tok) and back.config == tok.config
        x = _images(size=32)
        with torch.no_grad():
            torch.testing.assert_close(back.decode(back.encode(x)), tok.decode(tok.encode(x)))
        assert type(load_model(tmp_path / name, family=tok.family)) is type(tok)


# ------------------------------------------------------------------------------- quantizer statistics

def test_usage_and_perplexity():
    vq = VectorQuantizer(8, 4, usage_window=16)
    assert float(vq.usage()) == 0.0
    vq.record_usage(torch.tensor([0, 1, 1, 2]))
    assert float(vq.usage()) == pytest.approx(3 / 8)
    vq.record_usage(torch.arange(16) % 4 + 4)  # fills the window: only codes 4..7 remain
    assert float(vq.usage()) == pytest.approx(4 / 8)
    assert float(perplexity(torch.tensor([3, 3, 3]), 8)) == pytest.approx(1.0)
    assert float(perplexity(torch.arange(8), 8)) == pytest.approx(8.0)


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8, usage_window=256).train()
    with torch.no_grad():  # collapsed codebook: every code equal, so only code 0 is ever nearest
        vq.embedding.weight.copy_(torch.tensor([1.0] + [0.0] * 7).expand(32, 8))
    z = torch.randn(4, 8, 8, 8)  # 256 encoder outputs spread over the sphere
    before = vq(z).indices.unique().numel()
    restart = DeadCodeRestart(32, 8, restart_after=3, bank_size=128)
    revived = 0
    for _ in range(4):
        out = vq(z)
        restart.observe(out.indices, out.z)
        revived += int(restart.step(vq))
    after = vq(z).indices.unique().numel()
    assert before == 1 and revived == 31  # re-seeded once each, after 3 unused steps
    assert after > 16 and float(vq.usage()) > 0.5


# ------------------------------------------------------------------------------- training

def _smooth_batch(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("name", ["vq_f4_32px", "kl_f4_32px"])
def test_tokenizer_overfits_a_small_batch(name):
    from arvision.objectives.tokenizer import TokenizerLossConfig, TokenizerObjective
    torch.manual_seed(0)
    model = create_model(name, ch=32, z_channels=32 if name.startswith("vq") else 16)
    obj = TokenizerObjective(model, TokenizerLossConfig(restart_after=5 if name.startswith("vq") else 0)).train()
    opt = torch.optim.Adam(obj.parameters(), lr=2e-3)
    x = _smooth_batch()
    first = None
    for step in range(40):
        loss, metrics = obj(x, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_step()
        first = first if first is not None else float(metrics["rec"])
    last = float(metrics["rec"])
    assert last < 0.5 * first, (first, last)
    assert float(metrics["psnr"]) > 18
    if name.startswith("vq"):
        assert 0 < float(metrics["usage"]) <= 1 and float(metrics["perplexity"]) > 1
    else:
        assert float(metrics["kl"]) > 0


# ------------------------------------------------------------------------------- token cache and CLI

def _folder(root, n_per_class=3, corrupt=1):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in range(n_per_class):
            arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(d / f"{i}.png")
    for i in range(corrupt):
        (root / "train" / "dog" / f"bad{i}.png").write_bytes(b"not a png")
    return root


def test_tokenizer_eval_saves_reconstructions_that_eval_fid_reads(tmp_path, capsys):
    """--save-recon: every reconstruction (uint8, H x W x 3) with its label, in the dataset's order, as ADM's .npz,
    the file `arvision eval fid` scores against the training set's statistics."""
    import json
    import numpy as np
    import arvision
    from arvision.cli import main
    from arvision.data.transforms import unit_range_to_uint8
    from arvision.eval.generative import open_images
    from arvision.tasks.tokenizer import image_set
    data = _folder(tmp_path / "data", n_per_class=3, corrupt=0)
    torch.manual_seed(0)
    tok_dir = arvision.save_model(create_model("vq_f4_32px_lite"), tmp_path / "tok")
    main(["tokenizer", "eval", str(tok_dir), "--data", str(data), "--split", "train", "--img-size", "16",
          "--num-workers", "0", "--batch-size", "4", "--device", "cpu", "--save-recon", str(tmp_path / "r.npz")])
    assert json.loads(capsys.readouterr().out)["reconstructions"] == str(tmp_path / "r.npz")
    ds = image_set(data, "train", 16)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    tok = load_tokenizer(tok_dir).eval()
    with torch.no_grad():
        expect = unit_range_to_uint8(tok.decode(tok.encode(x))).permute(0, 2, 3, 1).numpy().astype(int)
    arrays = np.load(tmp_path / "r.npz")
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (6, 16, 16, 3)
    assert np.abs(arrays["arr_0"].astype(int) - expect).max() <= 1
    assert arrays["arr_1"].tolist() == [ds[i][1] for i in range(len(ds))] == [0, 0, 0, 1, 1, 1]
    assert len(open_images(tmp_path / "r.npz")) == 6
    with pytest.raises(SystemExit):  # a folder is refused before the pass, in one line
        main(["tokenizer", "eval", str(tok_dir), "--data", str(data), "--split", "train", "--save-recon", str(tmp_path)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--save-recon" in err and "is a folder" in err


@pytest.mark.parametrize("name", ["vq_f4_32px", "kl_f4_32px"])
def test_token_cache_round_trip(tmp_path, name):
    from arvision.data.transforms import generation_transform
    from arvision.data.token_cache import TokenCache
    from arvision.data.token_cache_writer import build_token_cache
    from arvision.data.datasets import ImageFolderDataset
    data = _folder(tmp_path / "data")
    tok = create_model(name, ch=32).eval()
    stats = build_token_cache(tok, data, tmp_path / "cache", img_size=16, batch_size=4, num_workers=0, progress=False)
    assert stats["num_images"] == 7 and stats["skipped"] == 1
    cache = TokenCache(tmp_path / "cache", flip=False, sample=False)
    assert len(cache) == 6 and cache.info["grid_size"] == 4 and cache.info["num_classes"] == 2
    ds = ImageFolderDataset(data / "train")
    tf = generation_transform(16)
    ok_rows = [i for i, (p, _) in enumerate(ds.samples) if "bad" not in p]
    for j, row in enumerate(ok_rows):
        img, label = ds._load(row)
        x = (tf(img).float() / 127.5 - 1)[None]
        tokens, y = cache[j]
        assert int(y) == label
        with torch.no_grad():
            for copy, xx in enumerate((x, x.flip(-1))):
                ref_tokens = tok.encode(xx) if tok.token_type == "discrete" else tok.encode(xx)
                got = cache.grids(copy)[j:j + 1]
                if tok.token_type == "discrete":
                    assert torch.equal(got, ref_tokens)
                else:
                    torch.testing.assert_close(got, ref_tokens, rtol=1e-5, atol=1e-5)
        if tok.token_type == "discrete":
            assert torch.equal(tokens, cache.grids(0)[j].flatten())
        else:
            assert tokens.shape == (16, tok.latent_channels)
    back = cache.load_tokenizer()
    assert type(back) is type(tok) and back.config == tok.config


def test_interrupted_cache_resumes_and_is_never_complete_early(tmp_path, monkeypatch):
    from arvision.data import token_cache as tc, token_cache_writer as w
    data = _folder(tmp_path / "data", n_per_class=4, corrupt=0)
    tok = create_model("vq_f4_32px", ch=32).eval()
    full = w.build_token_cache(tok, data, tmp_path / "ref", img_size=16, batch_size=3, num_workers=0, progress=False)
    real_write, writes = w._write_header, []

    def crash_after_two(path, obj):
        real_write(path, obj)
        writes.append(obj["encoded"])
        if len(writes) == 3:  # the fresh header, then two batches
            raise KeyboardInterrupt
    monkeypatch.setattr(w, "_write_header", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        w.build_token_cache(tok, data, tmp_path / "c", img_size=16, batch_size=3, num_workers=0, progress=False)
    monkeypatch.setattr(w, "_write_header", real_write)
    with pytest.raises(ValueError, match="incomplete \\(6/8"):
        tc.TokenCache(tmp_path / "c")
    stats = w.build_token_cache(tok, data, tmp_path / "c", img_size=16, batch_size=3, num_workers=0, progress=False)
    assert stats["resumed_from"] == 6 and full["resumed_from"] == 0
    a, b = tc.TokenCache(tmp_path / "ref", flip=False), tc.TokenCache(tmp_path / "c", flip=False)
    assert torch.equal(a.grids(0), b.grids(0)) and torch.equal(a.grids(1), b.grids(1))
    # other settings never mix two encodings: an error naming them, or (overwrite) a fresh encode
    with pytest.raises(ValueError, match=r"img_size \(cache 16, now 8\).*--overwrite"):
        w.build_token_cache(tok, data, tmp_path / "c", img_size=8, batch_size=3, num_workers=0, progress=False)
    stats = w.build_token_cache(tok, data, tmp_path / "c", img_size=8, batch_size=3, num_workers=0, progress=False,
                                overwrite=True)
    assert stats["resumed_from"] == 0 and tc.TokenCache(tmp_path / "c").info["grid_size"] == 2


def test_tokenizer_cli_train_eval_encode_reconstruct(tmp_path, capsys):
    import json
    from arvision.cli import main
    data = _folder(tmp_path / "data", n_per_class=4, corrupt=0)
    (data / "test").symlink_to(data / "train")
    main(["tokenizer", "train", "--data", str(data), "--out", str(tmp_path / "run"), "train.max_steps=2",
          "train.batch_size=4", "data.img_size=16", "data.num_workers=0", "model.args={ch: 32}", "eval.num_images=4"])
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["steps"] == 2 and res["eval"]["num_images"] == 4 and 0 < res["eval"]["codebook_usage"] <= 1
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    capsys.readouterr()
    main(["tokenizer", "eval", str(ckpt), "--data", str(data), "--num-workers", "0"])
    out = json.loads(capsys.readouterr().out)
    assert out["img_size"] == 16 and out["num_images"] == 8 and out["psnr"] > 0
    main(["tokenizer", "encode", "--tokenizer", str(ckpt), "--data", str(data), "--out", str(tmp_path / "cache"),
          "--num-workers", "0"])
    enc = json.loads(capsys.readouterr().out)
    assert enc["num_images"] == 8 and enc["skipped"] == 0
    from arvision.data.token_cache import TokenCache
    assert len(TokenCache(tmp_path / "cache")) == 8
    img = next((data / "train" / "cat").iterdir())
    main(["tokenizer", "reconstruct", str(ckpt), "--images", str(img), "--out", str(tmp_path / "r.png")])
    assert (tmp_path / "r.png").is_file()


# ------------------------------------------------------------------------------- optional loss terms

def test_lpips_needs_weight_files_and_measures_distance(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers
    from arvision.models.tokenizers.perceptual import LPIPS
    from arvision.objectives.tokenizer import TokenizerLossConfig, TokenizerObjective
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth .*vgg.pth"):
        LPIPS(str(tmp_path / "none.pth"), str(tmp_path / "none2.pth"))
    with pytest.raises(FileNotFoundError, match="perceptual_weight=0"):
        TokenizerObjective(create_model("vq_f4_32px", ch=32), TokenizerLossConfig(
            perceptual_weight=1.0, lpips_vgg_path=str(tmp_path / "none.pth"), lpips_lin_path=str(tmp_path / "n")))
    torch.manual_seed(0)
    trunk = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    torch.save(trunk, tmp_path / "vgg16-397923af.pth")  # the key layout of torchvision's vgg16 file
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS.chans)},
               tmp_path / "vgg.pth")
    lp = LPIPS(str(tmp_path / "vgg16-397923af.pth"), str(tmp_path / "vgg.pth"))
    x = _images(n=2, size=32)
    d = lp(x, torch.cat([x[:1], x[1:] * 0.2]))
    assert float(lp(x, x).abs().max()) < 1e-6 and d[0] < 1e-6 < d[1]


def test_classifier_perceptual_distance_trains_the_tokenizer_and_stays_frozen(tmp_path):
    """objective.perceptual_net: LPIPS's recipe in a classifier's feature maps (no VGG file needed)."""
    import arvision
    from arvision.objectives.tokenizer import TokenizerLossConfig, TokenizerObjective, classifier_distance

    torch.manual_seed(0)
    judge = create_model("timm_resnet10t_32px", num_classes=10)
    with torch.no_grad():  # batch-norm statistics away from (0, 1), so that eval mode matters
        for m in judge.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    arvision.save_model(judge, tmp_path / "judge")
    dist = classifier_distance(str(tmp_path / "judge"))
    x = _images(n=3, size=32)
    d = dist(x, torch.cat([x[:1], x[1:2] * 0.9, x[2:] * 0.2]))
    assert float(dist(x, x).abs().max()) < 1e-6 and d[0] < 1e-6 < d[1] < d[2]
    assert len(judge.forward_intermediates(x, intermediates_only=True)) >= 4  # every stage's map is compared
    with pytest.raises(ValueError, match="forward_intermediates"):
        from arvision.models.tokenizers.perceptual import ClassifierDistance
        ClassifierDistance(create_model("vq_f4_32px", ch=32), (0.5,) * 3, (0.5,) * 3)

    from arvision.config import load_config  # the task's YAML knows the key
    cfg = load_config("tokenizer", overrides=["objective.perceptual_weight=1.0",
                                              f"objective.perceptual_net={tmp_path / 'judge'}"])
    tok = create_model("vq_f4_32px", ch=32)
    objective = TokenizerObjective(tok, TokenizerLossConfig.from_dict(dict(cfg.objective)))
    objective.train()
    assert not any(k.startswith("net.") or "_lpips" in k for k in objective.state_dict())  # not saved with the run
    frozen = {k: v.clone() for k, v in objective._lpips[0].state_dict().items()}
    loss, metrics = objective(x)
    loss.backward()
    assert "perceptual" in metrics and float(metrics["perceptual"]) > 0 and not objective._lpips[0].net.training
    assert all(p.grad is None for p in objective._lpips[0].parameters())
    assert tok.decoder.conv_out.weight.grad.abs().sum() > 0
    for k, v in objective._lpips[0].state_dict().items():  # the forward pass left the running statistics alone
        assert torch.equal(v, frozen[k]), k


def test_patchgan_terms_train_each_side_only():
    from arvision.objectives.tokenizer import TokenizerLossConfig, TokenizerObjective
    obj = TokenizerObjective(create_model("vq_f4_32px", ch=32), TokenizerLossConfig(disc_weight=0.5, disc_layers=2))
    x = _images(n=2, size=32)
    loss, m = obj(x)
    assert set(m) >= {"g_loss", "d_loss"}
    loss.backward()
    assert all(p.grad is not None for p in obj.discriminator.parameters() if p.requires_grad)
    assert obj.model.decoder.conv_out.weight.grad is not None
    recon = obj.model(x)[0]
    g_loss, d_loss = obj.adversarial_terms(x, recon)
    disc, tok = list(obj.discriminator.parameters()), list(obj.model.parameters())
    g_disc = torch.autograd.grad(g_loss, disc, retain_graph=True, allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0 for g in g_disc)
    assert float(torch.autograd.grad(g_loss, obj.model.decoder.conv_out.weight, retain_graph=True)[0].abs().max()) > 0
    assert all(g is None for g in torch.autograd.grad(d_loss, tok, retain_graph=True, allow_unused=True))
    assert any(g is not None and float(g.abs().max()) > 0 for g in torch.autograd.grad(d_loss, disc))
    with pytest.raises(ValueError, match="unknown config keys \\['nope'\\] for TokenizerLossConfig"):
        TokenizerLossConfig.from_dict({"nope": 1})


def test_eval_reports_psnr_and_the_kl_scale_factor():
    from arvision.eval.tokenizer import evaluate_tokenizer
    from arvision.objectives.tokenizer import psnr
    tok = create_model("kl_f4_32px", ch=32).eval()
    x = _smooth_batch(n=6)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(6, dtype=torch.long))
    res = evaluate_tokenizer(tok, ds, batch_size=4, num_workers=0)
    with torch.no_grad():
        z = tok.encode(x).double()
        expect_psnr = float(psnr(tok.decode(z.float()), x))
    assert res["num_images"] == 6 and res["psnr"] == pytest.approx(expect_psnr, abs=1e-3)
    assert res["suggested_scale_factor"] == pytest.approx(1 / float(z.std(unbiased=False)), rel=1e-4)
    assert float(psnr(x, x)) > 90 and float(psnr(-torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 2))) == pytest.approx(0)
