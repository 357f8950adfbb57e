"""Sharing checkpoints (issue 20): `arvision hub push` (--local offline, the upload through huggingface_hub with its
network calls replaced), the model card's metadata, load_tokenizer of a Hub id, `convert --to official` with class
names."""
import json

import pytest
import torch
import yaml

huggingface_hub = pytest.importorskip("huggingface_hub")

from arvision.checkpoints import load_model, load_tokenizer, save_model  # noqa: E402
from arvision.cli import main  # noqa: E402
from arvision.models import create_model  # noqa: E402


def _run_with_checkpoint(tmp_path, num_classes=10, source="/data/cifar10"):
    torch.manual_seed(0)
    model = create_model("nepa_tiny_patch4_32", num_classes=num_classes)
    run = tmp_path / "runs" / "ft"
    ckpt = save_model(model, run / "checkpoints" / "step_00000010", ema_state_dict={
        k: v + 1 for k, v in model.state_dict().items()})
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"source": source}, "train": {"epochs": 1}}))
    (run / "results.json").write_text(json.dumps({"final": {"top1": 81.25, "top5": 97.5}, "best_step": 10,
                                                  "note": "text is not a metric"}))
    (run / "run.json").write_text(json.dumps({"command": ["arvision", "finetune", "--data", source]}))
    return model, ckpt


def test_hub_push_local_loads_back_identically_with_a_parsable_card(tmp_path):
    model, ckpt = _run_with_checkpoint(tmp_path)
    out = tmp_path / "hub"
    main(["hub", "push", str(ckpt), "me/nepa-tiny", "--local", str(out)])
    loaded = load_model(out)
    assert loaded.config.to_dict() == model.config.to_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ema = load_model(out, ema=True)
    assert torch.equal(ema.state_dict()["cls_token"], model.state_dict()["cls_token"] + 1)
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["source"] == "/data/cifar10"

    card = huggingface_hub.ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "arvision"
    assert meta["license"] == "apache-2.0"
    assert {"arvision", "nepa_vit", "image-classification"} <= set(meta["tags"])
    assert meta["datasets"] == ["cifar10"]
    assert meta["arvision_results"] == {"final/top1": 81.25, "final/top5": 97.5, "best_step": 10}
    assert "arvision finetune --data /data/cifar10" in card.text
    assert "| final/top1 | 81.25 |" in card.text
    assert 'arvision.load_model("me/nepa-tiny")' in card.text


def test_hub_push_uploads_the_same_folder(tmp_path, monkeypatch):
    model, ckpt = _run_with_checkpoint(tmp_path)
    calls = {}

    def create_repo(repo_id, **kw):
        calls["created"] = repo_id

    def upload_folder(repo_id, folder_path, **kw):
        from pathlib import Path
        calls["uploaded"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()))
        calls["card"] = huggingface_hub.ModelCard.load(Path(folder_path) / "README.md").data.to_dict()
        return "https://huggingface.co/me/nepa-tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    main(["hub", "push", str(ckpt), "me/nepa-tiny", "--license", "mit", "--dataset", "uoft-cs/cifar10"])
    assert calls["created"] == "me/nepa-tiny"
    assert calls["uploaded"] == ("me/nepa-tiny", ["README.md", "arvision.json", "config.yaml", "ema.safetensors",
                                                  "model.safetensors", "results.json"])
    assert calls["card"]["license"] == "mit" and calls["card"]["datasets"] == ["uoft-cs/cifar10"]


def test_hub_push_failure_is_one_line(tmp_path, monkeypatch, capsys):
    _, ckpt = _run_with_checkpoint(tmp_path)

    def create_repo(repo_id, **kw):
        raise RuntimeError("401 Client Error: Unauthorized\nmore details")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    with pytest.raises(SystemExit):
        main(["hub", "push", str(ckpt), "me/nepa-tiny"])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "me/nepa-tiny failed (401 Client Error: Unauthorized)" in err and "--local" in err


def test_load_tokenizer_reads_a_hub_id(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tok = create_model("vq_f4_32px_lite")
    snapshot = tmp_path / "snapshot"  # what `hub push` uploads for a tokenizer
    main(["hub", "push", str(save_model(tok, tmp_path / "tok")), "me/vq-lite", "--local", str(snapshot)])
    assert 'arvision.load_tokenizer("me/vq-lite")' in (snapshot / "README.md").read_text()
    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        asked.append((repo_id, revision))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = load_tokenizer("me/vq-lite@v1")
    assert asked == [("me/vq-lite", "v1")]
    assert type(loaded) is type(tok)
    for key, value in tok.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_convert_to_official_names_the_classes(tmp_path, capsys):
    model, ckpt = _run_with_checkpoint(tmp_path, source="synthetic-digits")
    main(["convert", str(ckpt), str(tmp_path / "official"), "--to", "official"])
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(10)}  # the run's data: the digits 0-9
    loaded = load_model(tmp_path / "official")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    main(["convert", str(ckpt), str(tmp_path / "official2"), "--to", "official", "--class-names", str(names)])
    config = json.loads((tmp_path / "official2" / "config.json").read_text())
    assert config["id2label"]["3"] == "class 3" and config["label2id"]["class 9"] == 9

    with pytest.raises(SystemExit):
        main(["convert", str(ckpt), str(tmp_path / "official3"), "--to", "official", "--class-names", "a,b"])
    assert "gives 2 class names but the checkpoint has 10 classes" in capsys.readouterr().err
    assert not (tmp_path / "official3").exists()
