"""What a new user meets (issue 20): every long phase shows a progress bar with an ETA (also when stderr is a file or
a pipe, as under pytest's capture), only on the main process; sample grids name their rows; a reconstruction grid of
a class-sorted folder shows every class."""
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_metrics import _ColourClassifier, _class_images

import arvision
from arvision.cli import main
from arvision.config import load_config
from arvision.data.token_cache import TokenCache
from arvision.eval import extract_features
from arvision.eval.generative import evaluate_generative
from arvision.generate.outputs import class_grid, tile_images
from arvision.tasks.pretrain import probe_report
from arvision.train import logging as run_logging

ETA = re.compile(r"100%.*\d+/\d+ \[\d\d:\d\d<00:00")  # tqdm's closing state: count, elapsed<remaining


def _class_folder(root, colours, per_class: int, size: int = 32):
    """An image folder (train/ and val/), class-sorted, each class one solid colour."""
    for split in ("train", "val"):
        for c, colour in enumerate(colours):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(root / split / f"class{c}" / f"{i}.png")
    return root


COLOURS = [(230, 30, 30), (30, 200, 30), (30, 30, 230), (230, 230, 30)]


# --------------------------------------------------------------------------------------------------- progress bars
def test_pretrain_probes_show_progress_bars_with_an_eta(capsys):
    cfg = load_config("pretrain", overrides=["model.args.depth=2", "eval.train_samples=20", "eval.val_samples=10",
                                             "eval.blocks=[last]", "eval.linear_epochs=2", "data.num_workers=0"])
    torch.manual_seed(0)
    model = arvision.create_model(cfg.model.name, depth=2)
    report = probe_report(cfg, model, 32, torch.device("cpu"))
    assert set(report["last"]) == {"knn_pretrained", "knn_random_init", "linear_pretrained", "linear_random_init"}
    err = capsys.readouterr().err
    for phase in ("probe block last, pretrained: train features", "probe block last, random init: val features",
                  "linear probe"):
        assert phase in err
    closing = [line for line in re.split(r"[\r\n]+", err) if ETA.search(line)]
    assert any("train features" in line for line in closing) and any("linear probe" in line for line in closing)
    # the linear probe's bar counts epochs: 4 swept lrs and the final fit, 2 epochs each
    assert any(re.search(r"linear probe: 100%.* 10/10 ", line) for line in closing)


def test_eval_linear_command_shows_extraction_and_epoch_bars(tmp_path, capsys):
    data = _class_folder(tmp_path / "data", COLOURS, per_class=3)
    torch.manual_seed(0)
    ckpt = arvision.save_model(arvision.create_model("nepa_tiny_patch4_32", depth=1), tmp_path / "nepa")
    main(["eval", "linear", str(ckpt), "--data", str(data), "--epochs", "2", "--num-workers", "0",
          "--out", str(tmp_path / "res.json")])
    err = capsys.readouterr().err
    closing = [line for line in re.split(r"[\r\n]+", err) if ETA.search(line)]
    assert [d for d in ("train features", "test features", "linear probe") if not any(d in c for c in closing)] == []


def test_eval_classify_command_shows_a_bar(tmp_path, capsys):
    data = _class_folder(tmp_path / "data", COLOURS, per_class=3)
    torch.manual_seed(0)
    ckpt = arvision.save_model(arvision.create_model("nepa_tiny_patch4_32", depth=1, num_classes=4), tmp_path / "cls")
    main(["eval", "classify", str(ckpt), "--data", str(data), "--batch-size", "5", "--num-workers", "0",
          "--out", str(tmp_path / "res.json")])
    closing = [line for line in re.split(r"[\r\n]+", capsys.readouterr().err) if ETA.search(line)]
    assert any(line.startswith("classify") and "3/3" in line for line in closing)


def test_eval_fid_reference_stage_shows_a_bar_and_the_bars_stay_off_other_ranks(tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "samples.npz", arr_0=_class_images(3, seed=0)[0])
    np.savez(tmp_path / "ref.npz", arr_0=_class_images(6, seed=1)[0])
    kw = dict(extractor=_ColourClassifier(), num_workers=0, batch_size=8)
    evaluate_generative(tmp_path / "samples.npz", tmp_path / "ref.npz", **kw)
    closing = [line for line in re.split(r"[\r\n]+", capsys.readouterr().err) if ETA.search(line)]
    assert any(line.startswith("reference features") and "8/8" in line for line in closing)
    assert any(line.startswith("samples features") for line in closing)

    monkeypatch.setattr(run_logging, "is_main_process", lambda: False)  # as on rank 1 of a process group
    evaluate_generative(tmp_path / "samples.npz", tmp_path / "ref.npz", **kw)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4)))
    extract_features(arvision.create_model("nepa_tiny_patch4_32", depth=1), loader)
    assert "%|" not in capsys.readouterr().err


def test_tokenizer_eval_shows_a_bar_and_its_grid_spans_the_classes(tmp_path, capsys):
    """24 images of 4 classes, sorted by class (an image folder): the grid's 16 originals come from every class, not
    the first 16 images (all of class 0 and 1)."""
    data = _class_folder(tmp_path / "data", COLOURS, per_class=6)
    torch.manual_seed(0)
    tok = arvision.save_model(arvision.create_model("vq_f4_32px_lite"), tmp_path / "tok")
    grid = tmp_path / "grid.png"
    main(["tokenizer", "eval", str(tok), "--data", str(data), "--img-size", "32", "--num-workers", "0",
          "--batch-size", "5", "--device", "cpu", "--grid", str(grid)])
    closing = [line for line in re.split(r"[\r\n]+", capsys.readouterr().err) if ETA.search(line)]
    assert any(line.startswith("tokenizer eval") and "5/5" in line for line in closing)
    pixels = np.asarray(Image.open(grid).convert("RGB")).astype(int)
    assert pixels.shape == (4 * 34 + 2, 8 * 34 + 2, 3)  # 16 pairs (original, reconstruction), 8 tiles a row
    shown = []
    for pair in range(16):
        row, col = divmod(2 * pair, 8)
        centre = pixels[2 + row * 34 + 16, 2 + col * 34 + 16]
        shown.append(int(np.argmin([np.abs(centre - np.array(c)).sum() for c in COLOURS])))
    assert shown == sorted(shown) and set(shown) == {0, 1, 2, 3}
    assert all(np.abs(pixels[2 + divmod(2 * p, 8)[0] * 34 + 16, 2 + divmod(2 * p, 8)[1] * 34 + 16]
                      - np.array(COLOURS[c])).sum() < 6 for p, c in enumerate(shown))


def test_tokenizer_eval_rfid_stage_shows_its_bars(tmp_path, capsys, monkeypatch):
    """--fid extracts features of the originals and of the reconstructions after the reconstruction pass: each a bar."""
    from arvision.metrics import extractors
    from arvision.metrics.extractors import FeatureExtractor

    class MeanColour(FeatureExtractor):
        name = "mean-colour"

        def features(self, images):
            x = images.double() / 255
            return {"pool": torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)}

    monkeypatch.setattr(extractors, "build_extractor", lambda spec, device="cpu": MeanColour())
    data = _class_folder(tmp_path / "data", COLOURS, per_class=6)
    torch.manual_seed(0)
    tok = arvision.save_model(arvision.create_model("vq_f4_32px_lite"), tmp_path / "tok")
    main(["tokenizer", "eval", str(tok), "--data", str(data), "--img-size", "32", "--num-workers", "0",
          "--batch-size", "5", "--device", "cpu", "--fid", "--json", str(tmp_path / "r.json")])
    closing = [line for line in re.split(r"[\r\n]+", capsys.readouterr().err) if ETA.search(line)]
    for what in ("originals", "reconstructions"):
        assert any(line.startswith(f"rFID features: {what}") and "5/5" in line for line in closing), closing


# ------------------------------------------------------------------------------------------------- labelled grids
def _dark_rows(column: np.ndarray, row_height: int, rows: int) -> list[int]:
    return [int((column[r * row_height:(r + 1) * row_height] < 100).any(-1).sum()) for r in range(rows)]


def test_class_grid_labels_each_row_only_when_asked():
    images = torch.full((6, 16, 16, 3), 128, dtype=torch.uint8)
    labels = torch.tensor([2, 0, 2, 0, 5, 5])
    plain = class_grid(images, labels)
    assert plain.shape == (3 * 18, 2 * 18, 3)  # the size other code relies on is unchanged
    assert np.array_equal(plain, tile_images([images[:2], images[2:4], images[4:]], 2))
    by_index = class_grid(images, labels, labelled=True)
    by_name = class_grid(images, labels, labelled=True, class_names=["airplane", "bird", "cat", "d", "e", "frog"])
    for grid in (by_index, by_name):
        width = grid.shape[1] - plain.shape[1]
        assert width > 0 and grid.shape[0] == plain.shape[0] and np.array_equal(grid[:, width:], plain)
        assert all(n > 0 for n in _dark_rows(grid[:, :width], 18, 3))  # text on every row
    assert by_name.shape[1] > by_index.shape[1]  # "airplane" is wider than "0"
    assert np.array_equal(class_grid(images, labels, labelled=True, class_names=[]), by_index)  # no names: indices
    with pytest.raises(ValueError, match="2 row labels for 3 rows"):
        tile_images([images[:2]] * 3, 2, ["a", "b"])


@pytest.fixture(scope="module")
def generator_run(vq_token_cache, tmp_path_factory):
    """A tiny generator over the shared cache's 8 x 8 codes, saved inside a run directory that names the cache."""
    run = tmp_path_factory.mktemp("labelled") / "run"
    torch.manual_seed(0)
    cache = TokenCache(vq_token_cache)
    model = arvision.create_model("heptapod_tiny", grid_size=8, codebook_size=cache.info["codebook_size"],
                                  num_classes=cache.info["num_classes"], embed_dim=32, depth=1, num_heads=2,
                                  head_depth=1).eval()
    ckpt = arvision.save_model(model, run / "checkpoints" / "step_00000001")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"source": str(vq_token_cache)}}))
    return model, cache, ckpt


def test_heptapod_train_and_sample_grids_name_their_rows(generator_run, tmp_path):
    from types import SimpleNamespace

    from arvision.tasks.heptapod import write_samples

    model, cache, ckpt = generator_run
    names = cache.info["classes"]
    assert len(names) == 10 and all(isinstance(n, str) and n for n in names)

    scfg = SimpleNamespace(num_per_class=1, seed=0, batch_size=10, temperature=1.0, top_k=0, top_p=1.0,
                           diffusion_steps=4, diffusion_temperature=1.0, diffusion_variance="large", precision="fp32")
    write_samples(model, cache, scfg, tmp_path)
    with np.load(tmp_path / "samples.npz") as z:
        images, labels = torch.from_numpy(z["arr_0"]), torch.from_numpy(z["arr_1"])
    grid = np.asarray(Image.open(tmp_path / "samples.png").convert("RGB"))
    assert np.array_equal(grid, class_grid(images, labels, 1, labelled=True, class_names=names))
    assert grid.shape[1] > class_grid(images, labels, 1, labelled=True).shape[1]  # names, not indices

    out = tmp_path / "sampled"
    main(["sample", str(ckpt), "--out", str(out), "--num-per-class", "2", "--classes", "1,4", "--batch-size", "4"])
    with np.load(out / "samples.npz") as z:
        images, labels = torch.from_numpy(z["arr_0"]), torch.from_numpy(z["arr_1"])
    grid = np.asarray(Image.open(out / "samples.png").convert("RGB"))
    assert np.array_equal(grid, class_grid(images, labels, 2, labelled=True, class_names=names))
