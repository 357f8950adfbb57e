"""Files that cannot be read (refused pickles, truncated weights, Python tags in YAML), a DataError raised inside a
DataLoader worker and a full disk while saving a checkpoint: each is ONE line naming the file and what to do, never a
traceback (issue 15, item 6). No file here runs code: each malicious pickle would create a marker directory."""
import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import arvision
from arvision.cli import main

TINY_PRETRAIN = ["train.max_steps=1", "train.batch_size=4", "data.num_samples=16", "data.num_workers=0",
                 "eval.knn=false", "train.precision=fp32", "train.log_every=1"]


def one_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    stderr = capsys.readouterr().err.strip()
    err = stderr.splitlines()[-1]  # a training command logs its progress before the error
    assert e.value.code not in (0, None), stderr
    assert err.startswith("arvision: error:") and "Traceback" not in stderr, stderr
    return err


class _RunsCode:
    """Unpickling this would call os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _assert_refused(err, path, marker):
    assert str(path) in err and "mkdir" in err and "refuses" in err, err
    assert "weights_only` set to `False`" not in err and "=False" not in err, err  # never advise unsafe loading
    assert not marker.exists()


@pytest.fixture
def run_with_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    main(["pretrain", "--out", str(run), *TINY_PRETRAIN])
    capsys.readouterr()
    ckpt = run / "checkpoints" / "step_00000001"
    assert (ckpt / "state.pt").is_file()
    return run, ckpt


def test_refused_pickle_in_official_weights(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    src = tmp_path / "official"
    model = arvision.create_model("nepa_tiny_patch4_32")
    arvision.export_official(model, src)
    for f in src.glob("*.safetensors"):
        f.unlink()
    sd = model.state_dict()
    sd["payload"] = _RunsCode(marker)
    torch.save(sd, src / "pytorch_model.bin")
    err = one_line(["convert", str(src), str(tmp_path / "out")], capsys)
    _assert_refused(err, src / "pytorch_model.bin", marker)


def test_refused_pickle_in_published_tokenizer(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "args": _RunsCode(marker)}, path)
    err = one_line(["tokenizer", "reconstruct", str(path), "--images", str(path), "--out", str(tmp_path / "r.png")],
                   capsys)
    _assert_refused(err, path, marker)


def test_refused_pickle_in_lpips_weights(tmp_path):
    from arvision.files import FileFormatError
    from arvision.models.tokenizers.perceptual import LPIPS

    marker = tmp_path / "PWNED"
    torch.save({"features.0.weight": _RunsCode(marker)}, tmp_path / "vgg.pth")
    torch.save({}, tmp_path / "lin.pth")
    with pytest.raises(FileFormatError) as e:
        LPIPS(vgg_path=str(tmp_path / "vgg.pth"), lin_path=str(tmp_path / "lin.pth"))
    _assert_refused("arvision: error: " + str(e.value), tmp_path / "vgg.pth", marker)


def test_refused_pickle_and_truncated_files_on_resume(run_with_checkpoint, capsys):
    run, ckpt = run_with_checkpoint
    marker = run.parent / "PWNED"
    resume = ["pretrain", "--out", str(run), "--resume", *TINY_PRETRAIN[1:], "train.max_steps=2"]
    good_state = (ckpt / "state.pt").read_bytes()
    torch.save({"step": 1, "payload": _RunsCode(marker)}, ckpt / "state.pt")
    _assert_refused(one_line(resume, capsys), ckpt / "state.pt", marker)

    (ckpt / "state.pt").write_bytes(good_state[: len(good_state) // 2])
    err = one_line(resume, capsys)
    assert str(ckpt / "state.pt") in err and "truncated" in err, err

    (ckpt / "state.pt").write_bytes(good_state)
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    err = one_line(resume, capsys)
    assert str(ckpt / "model.safetensors") in err and "truncated" in err, err


def test_truncated_safetensors_when_loading_a_model(tmp_path, capsys):
    ckpt = arvision.save_model(arvision.create_model("nepa_tiny_patch4_32"), tmp_path / "ckpt")
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[:1000])
    err = one_line(["eval", "knn", str(ckpt), "--data", "synthetic", "--num-workers", "0"], capsys)
    assert str(ckpt / "model.safetensors") in err and "truncated" in err, err
    (ckpt / "arvision.json").write_text('{"format": "arvision", ')
    err = one_line(["eval", "knn", str(ckpt), "--data", "synthetic", "--num-workers", "0"], capsys)
    assert str(ckpt / "arvision.json") in err and "JSON" in err, err


def test_python_tag_in_a_yaml_recipe(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"train:\n  epochs: 1\n  lr: !!python/object/apply:os.mkdir ['{marker}']\n")
    err = one_line(["pretrain", "--config", str(recipe), "--print-config"], capsys)
    assert str(recipe) in err and "line 3" in err and "!!python" in err, err
    err = one_line(["pretrain", "--print-config", f"train.lr=!!python/object/apply:os.mkdir ['{marker}']"], capsys)
    assert "train.lr" in err and "!!python" in err, err
    recipe.write_text("train:\n  epochs: [1, 2\n")
    err = one_line(["pretrain", "--config", str(recipe), "--print-config"], capsys)
    assert str(recipe) in err and "not valid YAML" in err, err
    assert not marker.exists()


def _ade_with_bad_masks(root):
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            Image.fromarray(np.ones((10, 10), np.uint8)).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


def test_data_error_inside_dataloader_workers(tmp_path, capsys):
    data = _ade_with_bad_masks(tmp_path / "ade")
    out = tmp_path / "seg"
    err = one_line(["segment", "train", "--data", str(data), "--out", str(out), "data.num_workers=2",
                    "train.max_steps=1", "train.batch_size=2", "data.img_size=16", "data.crop_size=16",
                    "model.backbone_args={depth: 1, embed_dim: 16, num_heads: 1}",
                    "model.args={channels: 8, aux_channels: 4}"], capsys)
    assert "is 10x10 but its image" in err and "DataLoader worker" not in err, err


@pytest.mark.parametrize("failure", ["safetensors", "torch.save", "oserror"])
def test_disk_full_while_saving_a_checkpoint(tmp_path, capsys, monkeypatch, failure):
    """The three ways a full disk surfaces, as measured on a full tmpfs: safetensors' SafetensorError
    ('... os error 28'), torch.save's RuntimeError that loses the errno ('unexpected pos'), a plain OSError ENOSPC."""
    import safetensors

    from arvision.checkpoints import arvision_format
    from arvision.train import checkpoint as train_checkpoint

    if failure == "safetensors":
        def save_file(*a, **k):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(arvision_format, "save_file", save_file)
    elif failure == "torch.save":
        def torch_save(obj, f, *a, **k):
            open(f, "wb").write(b"PK")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(train_checkpoint.torch, "save", torch_save)
        real_usage = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0))
    else:
        def write_json(path, obj):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(arvision_format, "write_json", write_json)
    run = tmp_path / "run"
    err = one_line(["pretrain", "--out", str(run), *TINY_PRETRAIN], capsys)
    assert "no space left" in err.lower() and str(run / "checkpoints" / "step_00000001") in err, err
    assert "--resume" in err or "free" in err.lower()
    leftovers = [p.name for p in (run / "checkpoints").iterdir()] if (run / "checkpoints").exists() else []
    assert leftovers == [], leftovers  # the partial write is removed


def test_refused_pickle_in_inception_weights(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    weights = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _RunsCode(marker)}, weights)
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(samples / f"{i}.png")
    err = one_line(["eval", "fid", str(samples), str(samples), "--extractor", f"inception:{weights}"], capsys)
    _assert_refused(err, weights, marker)
