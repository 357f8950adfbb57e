"""The nearest-training-image check (`arvision eval nearest`): exact nearest neighbours, and copies found."""
import json

import numpy as np
from PIL import Image

from arvision.cli import main
from arvision.eval import nearest
from arvision.eval.generative import open_images


def _folder(root, images):
    for i, im in enumerate(images):
        (root / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / "train" / f"c{i % 2}" / f"{i:03d}.png")


def test_nearest_equals_brute_force_across_chunks_and_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(nearest, "REFERENCE_CHUNK", 7)  # several training chunks and sample blocks
    monkeypatch.setattr(nearest, "QUERY_BLOCK", 4)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    queries = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "t.npz", arr_0=train)
    np.savez(tmp_path / "q.npz", arr_0=queries)
    dist, index = nearest.nearest_training_images(open_images(tmp_path / "q.npz"), open_images(tmp_path / "t.npz"))
    full = np.sqrt(((queries.reshape(10, 1, -1) / 255.0 - train.reshape(1, 30, -1) / 255.0) ** 2).sum(-1))
    np.testing.assert_array_equal(index.numpy(), full.argmin(1))
    np.testing.assert_allclose(dist.numpy(), full.min(1), rtol=1e-5)


def test_copies_of_training_images_are_found_below_the_baseline(tmp_path, capsys):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    _folder(tmp_path / "data", train)
    unseen = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    copies = np.concatenate([train[:10], unseen[:10]])  # half the samples copy training images
    np.savez(tmp_path / "samples.npz", arr_0=copies)
    np.savez(tmp_path / "unseen.npz", arr_0=unseen[10:])
    main(["eval", "nearest", str(tmp_path / "samples.npz"), str(tmp_path / "data"), "--baseline",
          str(tmp_path / "unseen.npz"), "--grid", str(tmp_path / "g.png"), "--grid-n", "8",
          "--out", str(tmp_path / "r.json")])
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["below_baseline_q01"] == 0.5 and res["q01"] < 1e-3 < res["baseline"]["q01"]
    assert res["num"] == 20 and res["num_training"] == 40
    # the grid shows the 8 nearest samples (the copies) each beside its training image: identical halves
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (16 + 2, 16 * 18, 3)
    for k in range(8):
        left, right = grid[:16, 2 * k * 18:2 * k * 18 + 16], grid[:16, (2 * k + 1) * 18:(2 * k + 1) * 18 + 16]
        np.testing.assert_array_equal(left, right)
    assert "50.0% of samples below it" in capsys.readouterr().out
    # samples of another size are refused in one line
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((2, 32, 32, 3), np.uint8))
    try:
        main(["eval", "nearest", str(tmp_path / "big.npz"), str(tmp_path / "data")])
    except SystemExit:
        pass
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image-size" in err[0], err
