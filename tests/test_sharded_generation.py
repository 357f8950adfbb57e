"""Generation at scale (issue 18): per-sample randomness, sharded and resumable `arvision sample` (one process and
two gloo processes under torchrun, SIGKILL mid-run), `eval fid` refusing an incomplete sampling directory, and the
token cache encoded by two processes and with LlamaGen's ten crops."""
import json

import numpy as np
import pytest
import torch
from test_distributed import launch

import arvision
from arvision.cli import main
from arvision.data.token_cache import TokenCache
from arvision.data.token_cache_writer import build_token_cache
from arvision.generate import shards
from arvision.generate.outputs import class_labels
from arvision.generate.sample import SamplingConfig, draw_categorical, sample_tokens


def tiny_generator(**kw):
    torch.manual_seed(0)
    args = dict(grid_size=4, codebook_size=64, num_classes=5, embed_dim=32, depth=1, num_heads=2, head_depth=1)
    return arvision.create_model("heptapod_tiny", **{**args, **kw}).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A generator of 4 x 4 codes over 5 classes and a /4 VQ tokenizer (16 px images), saved."""
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    tok = arvision.create_model("vq_f4_32px", ch=32, ch_mult=(1, 1, 1), z_channels=16, codebook_size=64).eval()
    return arvision.save_model(tiny_generator(), root / "gen"), arvision.save_model(tok, root / "tok")


def sample_args(models, out, *extra):
    gen, tok = models
    return ["sample", str(gen), "--tokenizer", str(tok), "--out", str(out), "--num-per-class", "3",
            "--batch-size", "2", "--shard-size", "4", *extra]


def npz(path):
    with np.load(path) as z:
        return z["arr_0"].copy(), z["arr_1"].copy()


@pytest.mark.parametrize("kw", [dict(), dict(token_type="continuous", latent_channels=3)])
def test_a_sample_depends_on_its_index_not_on_its_batch(kw):
    model = tiny_generator(**kw)
    labels = torch.tensor([0, 1, 4, 2, 2, 3])
    cfg = SamplingConfig(diffusion_steps=4)
    whole = sample_tokens(model, labels, cfg, seed=5)
    parts = torch.cat([sample_tokens(model, labels[:2], cfg, seed=5, indices=[0, 1]),
                       sample_tokens(model, labels[2:], cfg, seed=5, indices=range(2, 6))])
    alone = sample_tokens(model, labels[3:4], cfg, seed=5, indices=[3])
    if whole.dtype == torch.long:
        assert torch.equal(parts, whole) and torch.equal(alone[0], whole[3])
    else:
        torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone[0], whole[3], atol=1e-5, rtol=1e-5)
    # another index or seed draws another sample of the same label
    assert not torch.equal(sample_tokens(model, labels[3:4], cfg, seed=5, indices=[4]), alone)
    assert not torch.equal(sample_tokens(model, labels[3:4], cfg, seed=6, indices=[3]), alone)


def test_draw_categorical_follows_the_probabilities_and_never_draws_a_filtered_token():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.8, 0.0]]).repeat(4, 1)
    u = torch.tensor([0.0, 0.19999, 0.2001, 1 - 2 ** -24])
    assert draw_categorical(probs, u).tolist() == [1, 1, 3, 3]
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    draws = draw_categorical(probs[:1].repeat(20000, 1), u)
    assert set(draws.tolist()) == {1, 3} and abs((draws == 3).float().mean().item() - 0.8) < 0.02


def test_sampling_directory_resumes_and_refuses_other_settings(models, tmp_path, capsys, monkeypatch):
    main(sample_args(models, tmp_path / "whole"))
    images, labels = npz(tmp_path / "whole" / "samples.npz")
    assert images.shape == (15, 16, 16, 3) and labels.tolist() == class_labels(range(5), 3, seed=0).tolist()
    assert not (tmp_path / "whole" / "shards").exists()  # deleted once assembled

    # interrupted after two of its four shards
    part = tmp_path / "part"
    write, written = shards._write_shard, []

    def write_two(*a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt
        write(*a, **k)
        written.append(1)

    monkeypatch.setattr(shards, "_write_shard", write_two)
    with pytest.raises(SystemExit):
        main(sample_args(models, part))
    monkeypatch.setattr(shards, "_write_shard", write)
    kept = sorted(p.name for p in (part / "shards").iterdir())
    assert kept == ["shard_000000.npz", "shard_000001.npz"] and not (part / "samples.npz").exists()
    capsys.readouterr()

    # eval fid refuses the directory (and its .npz path) in one line saying what is missing, before any network
    for target in (part, part / "samples.npz"):
        with pytest.raises(SystemExit):
            main(["eval", "fid", str(target), "synthetic", "--extractor", "no-such-extractor"])
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "7 of 15 samples are missing" in err and "2 of 4 shards" in err, err

    # a shard damaged on disk and a half-written temporary are not taken as done
    (part / "shards" / "shard_000001.npz").write_bytes((part / "shards" / "shard_000001.npz").read_bytes()[:300])
    (part / "shards" / ".shard_000002.npz.tmp-1").write_bytes(b"PK\x03\x04half")
    # another setting in the same directory: one line naming it, nothing written
    for flag, value, name in (("--seed", "1", "seed"), ("--temperature", "0.5", "temperature"),
                              ("--shard-size", "5", "shard_size")):
        extra = [flag, value] if flag != "--shard-size" else []
        argv = sample_args(models, part, *extra)
        if flag == "--shard-size":
            argv[argv.index("--shard-size") + 1] = value
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "other settings" in err and f"{name} (then" in err, err
    assert sorted(p.name for p in (part / "shards").iterdir())[-1] == "shard_000001.npz"

    main(sample_args(models, part, "--resume"))
    assert all(np.array_equal(a, b) for a, b in zip(npz(part / "samples.npz"), (images, labels)))
    main(sample_args(models, part))  # complete: nothing to do
    assert "already holds these 15 samples" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(sample_args(models, tmp_path / "new", "--resume"))
    assert "no sampling run to resume" in capsys.readouterr().err


KILL_DRIVER = '''
import os, signal, sys
import numpy as np
from arvision.cli import main

# rank 1 is killed (SIGKILL) half-way through writing its second shard
if os.environ["RANK"] == "1":
    savez, calls = np.savez, []

    def half_then_kill(f, **arrays):
        calls.append(1)
        if len(calls) == 2:
            import io
            buf = io.BytesIO()
            savez(buf, **arrays)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        savez(f, **arrays)

    np.savez = half_then_kill
main(sys.argv[1:])
'''


@pytest.mark.slow
def test_two_processes_sample_like_one_and_resume_after_sigkill(models, tmp_path):
    main(sample_args(models, tmp_path / "one"))
    want = npz(tmp_path / "one" / "samples.npz")
    launch(sample_args(models, tmp_path / "two")[0], sample_args(models, tmp_path / "two")[1:])
    got = npz(tmp_path / "two" / "samples.npz")
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])

    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    argv = sample_args(models, tmp_path / "killed")
    r = launch(argv[0], argv[1:], driver=driver, check=False)
    assert r.returncode != 0
    left = {p.name for p in (tmp_path / "killed" / "shards").iterdir()}
    assert not (tmp_path / "killed" / "samples.npz").exists() and any(".tmp-" in n for n in left), left
    launch(argv[0], argv[1:])
    got = npz(tmp_path / "killed" / "samples.npz")
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = arvision.create_model("vq_f4_32px", ch=32, ch_mult=(1, 1, 1), z_channels=16, codebook_size=64).eval()
    return arvision.save_model(tok, tmp_path_factory.mktemp("tok") / "tok")


def cache_arrays(path):
    header = json.loads((path / "header.json").read_text())
    header.pop("encode_seconds")
    arrays = {name: np.load(path / name) for name in ("tokens.npy", "labels.npy", "valid.npy")}
    return header, arrays


@pytest.mark.slow
def test_two_processes_encode_the_same_token_cache_as_one(tokenizer_dir, tmp_path):
    def encode(out):
        return ["encode", "--tokenizer", str(tokenizer_dir), "--data", "synthetic", "--out", str(out), "--img-size",
                "16", "--limit", "10", "--batch-size", "3", "--num-workers", "0"]

    main(["tokenizer", *encode(tmp_path / "one")])
    r = launch("tokenizer", encode(tmp_path / "two"))  # batches 0, 2 on rank 0; 1, 3 (one image) on rank 1
    assert json.loads(r.stdout)["encoded_here"] == 6  # rank 0's share; rank 1 wrote the other 4 rows
    (h1, a1), (h2, a2) = cache_arrays(tmp_path / "one"), cache_arrays(tmp_path / "two")
    assert h1 == h2 and h1["complete"] and h1["encoded"] == 10
    assert all(np.array_equal(a1[k], a2[k]) for k in a1)
    assert not (tmp_path / "two" / "done.npy").exists() and len(TokenCache(tmp_path / "two")) == 10


def test_ten_crop_cache_holds_llamagen_ten_crops(tmp_path, capsys):
    from PIL import Image
    from torchvision.transforms import TenCrop

    from arvision.data.transforms import center_crop_arr

    g = torch.Generator().manual_seed(0)
    for i in range(3):
        d = tmp_path / "data" / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(20, 26, 3, generator=g) * 255).to(torch.uint8).numpy()).save(d / f"{i}.png")
    torch.manual_seed(0)
    tok = arvision.create_model("vq_f4_32px", ch=32, ch_mult=(1, 1, 1), z_channels=16, codebook_size=64).eval()
    build_token_cache(tok, tmp_path / "data", tmp_path / "cache", img_size=8, batch_size=2, num_workers=0,
                      progress=False, ten_crop=True, crop_range=1.25)
    cache = TokenCache(tmp_path / "cache", flip=False)
    assert cache.info["copies"] == 10 and cache.info["crop"] == "ten-crop 1.25x"
    files = sorted((tmp_path / "data" / "train").glob("*/*.png"))
    for row, path in enumerate(files):
        with Image.open(path) as im:
            crops = TenCrop(8)(center_crop_arr(im.convert("RGB"), 10))  # LlamaGen: 5 crops, then 5 of the mirror
        x = torch.stack([torch.from_numpy(np.array(c)).permute(2, 0, 1).float() / 127.5 - 1 for c in crops])
        with torch.no_grad():
            want = tok.encode(x).reshape(10, -1)
        got = torch.from_numpy(np.array(cache.tokens[row])).long()
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
        assert torch.equal(got[0], want[4]) and torch.equal(got[1], want[9])  # copy 0: the centre; 1: its mirror
    # the ten crops are a setting of the cache: encoding it without them is refused
    with pytest.raises(ValueError, match=r"crop \(cache ten-crop 1.25x, now center\)"):
        build_token_cache(tok, tmp_path / "data", tmp_path / "cache", img_size=8, num_workers=0, progress=False)
    for argv, words in ((["--crop-range", "1.2"], "with --ten-crop"), (["--ten-crop", "--no-flip"], "--no-flip")):
        with pytest.raises(SystemExit):
            main(["tokenizer", "encode", "--tokenizer", "x", "--data", "synthetic", "--out", str(tmp_path / "n"),
                  *argv])
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err and not (tmp_path / "n").exists()
