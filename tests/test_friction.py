"""What a new user meets (issue 20): preset suggestions from the family the command expects, ignored output folders,
help that says what --data is, the split tokenizer eval really read, a loss curve that shows one point."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arvision.checkpoints import save_model
from arvision.cli import main
from arvision.models import create_model
from arvision.train.logging import plot_loss_curve

REPO = Path(__file__).resolve().parents[1]


def _last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("command, name, expected, not_expected", [
    (["pretrain"], "nepa_tiny_patch4", "did you mean nepa_tiny_patch4_32", "vq_f4_32px"),
    (["tokenizer", "train"], "vq_f4_32", "did you mean vq_f4_32px", "nepa_"),
    (["tokenizer", "train"], "nepa_tiny_patch4_32", "is a nepa_vit preset, not vq_tokenizer or kl_tokenizer", None),
])
def test_unknown_preset_suggests_the_closest_of_the_family_the_command_trains(command, name, expected, not_expected,
                                                                               tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--out", str(tmp_path / "run"), f"model.name={name}", "data.num_workers=0"])
    err = _last_error(capsys)
    assert err.startswith("arvision: error:") and expected in err and "arvision models --family" in err
    if not_expected:
        assert not_expected not in err.split("did you mean")[1]
    assert not (tmp_path / "run").exists()


def test_readme_output_folders_are_ignored_by_git():
    paths = ["cache/c10_vq/tokens.npy", "samples/samples.npz", "samples/grid.png"]
    r = subprocess.run(["git", "-C", str(REPO), "check-ignore", *paths], capture_output=True, text=True)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.stdout.split() == paths


def test_heptapod_train_help_describes_a_token_cache(capsys):
    with pytest.raises(SystemExit):
        main(["heptapod", "train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "a token cache" in out and "quick start" in out
    assert "training data: image folder" not in out


def test_tokenizer_eval_reports_the_split_it_read(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):  # no val/: val falls back to test
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / cls / f"{i}.png")
    tok = save_model(create_model("vq_f4_32px_lite"), tmp_path / "tok")
    main(["tokenizer", "eval", str(tok), "--data", str(tmp_path / "data"), "--img-size", "32", "--num-workers", "0",
          "--device", "cpu", "--json", str(tmp_path / "res.json")])
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["split"] == "test" and res["requested_split"] == "val"


def test_loss_curve_of_one_logged_point_is_not_empty(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 0.5}) + "\n")
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss_curve.png")
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    line_colour = np.array([31, 119, 180])  # matplotlib's first colour (C0)
    assert (np.abs(pixels - line_colour).sum(1) < 30).sum() > 10
