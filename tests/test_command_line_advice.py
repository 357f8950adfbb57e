"""Errors on command-line paths advise the command or flag a command-line user has, not a Python call (issue 20);
the same faults met from Python keep the Python advice."""
import pytest
import torch

import arvision
from arvision.cli import main


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("arvision: error: ")
    return lines[-1]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    torch.manual_seed(0)
    model = arvision.create_model("heptapod_tiny", grid_size=4, codebook_size=64, num_classes=3, embed_dim=32, depth=1,
                                  num_heads=2, head_depth=1, null_class=False)
    return arvision.save_model(model, tmp_path_factory.mktemp("advice") / "gen")


def test_a_checkpoint_of_another_family_names_the_command_that_takes_it(generator, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "knn", str(generator), "--data", "synthetic", "--out", str(tmp_path / "r.json")])
    err = _error_line(capsys)
    assert f"{generator} is a heptapod checkpoint, not nepa_vit" in err and "`arvision sample`" in err
    assert "load_model" not in err and "family=" not in err
    with pytest.raises(ValueError, match=r"load it with arvision.load_model\(path, family='heptapod'\)"):
        arvision.load_model(generator, family="nepa_vit")  # from Python: the Python call


def test_ema_errors_name_the_flag(generator, tmp_path, capsys):
    for target in (generator, generator / "model.safetensors"):  # saved without EMA weights; a file, not a directory
        with pytest.raises(SystemExit):
            main(["sample", str(target), "--tokenizer", str(target), "--out", str(tmp_path / "s"), "--ema"])
        err = _error_line(capsys)
        assert "--ema" in err and "ema=True" not in err
    assert not (tmp_path / "s").exists()
    with pytest.raises(FileNotFoundError, match="load it without ema=True"):
        arvision.load_model(generator, ema=True)


def test_guidance_without_a_null_class_names_the_flags_before_anything_is_written(generator, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", str(generator), "--tokenizer", str(generator), "--out", str(tmp_path / "s"), "--cfg", "2"])
    err = _error_line(capsys)
    assert "--cfg 2.0 needs a generator trained with a null class" in err and "model.args.null_class=true" in err
    assert "cfg_scale" not in err and not (tmp_path / "s").exists()
