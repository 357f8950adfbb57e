"""The online evaluation of a generator without a judge: FD against reference statistics computed once, kept in
the run directory and reused (a resumed run does not extract them again), or read from a statistics .npz."""
import numpy as np
import pytest
import torch

from arvision.eval import judge as judge_module
from arvision.eval.judge import OnlineScore, real_images, reference_statistics
from arvision.metrics import save_stats
from arvision.metrics.extractors import FeatureExtractor


class ColourMoments(FeatureExtractor):
    """A cheap feature space for the tests: per-channel mean and std of the pixels."""
    name = "colour-moments"

    def features(self, images):
        x = images.double() / 255
        return {"pool": torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)}


def test_online_fd_is_zero_on_the_reference_and_large_on_noise(tmp_path):
    score = OnlineScore(ColourMoments(), "synthetic", num=64, stats_file=tmp_path / "stats.npz")
    real, labels = real_images("synthetic", "val", 64, 32)
    same = score(real.permute(0, 2, 3, 1), labels)
    noise = score(torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8), labels)
    assert set(same) == {"fd"}  # no classifier: no sample accuracy
    assert same["fd"] < 1e-6 and noise["fd"] > 1e-2


def test_reference_statistics_are_kept_and_reused_only_for_the_same_reference(tmp_path, monkeypatch):
    stats_file = tmp_path / "stats.npz"
    mu, sigma = reference_statistics(ColourMoments(), "synthetic", 48, "val", 32, stats_file)
    assert stats_file.is_file()

    def no_extraction(*args, **kwargs):
        raise AssertionError("reference images were read again")

    monkeypatch.setattr(judge_module, "real_images", no_extraction)
    mu2, sigma2 = reference_statistics(ColourMoments(), "synthetic", 48, "val", 32, stats_file)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    with pytest.raises(AssertionError, match="read again"):  # another count: other statistics
        reference_statistics(ColourMoments(), "synthetic", 40, "val", 32, stats_file)


def test_a_statistics_npz_of_the_same_extractor_is_read_and_another_is_refused(tmp_path):
    mu, sigma = np.arange(6.0), np.eye(6)
    save_stats(tmp_path / "ours.npz", {"mu": mu, "sigma": sigma}, "colour-moments")
    got = reference_statistics(ColourMoments(), str(tmp_path / "ours.npz"), 10, "val", 32)
    np.testing.assert_array_equal(got[0], mu)
    save_stats(tmp_path / "theirs.npz", {"mu": mu, "sigma": sigma}, "inception")
    with pytest.raises(ValueError, match="holds no statistics of colour-moments"):
        reference_statistics(ColourMoments(), str(tmp_path / "theirs.npz"), 10, "val", 32)


def test_heptapod_train_scores_online_against_a_folder_without_a_judge(vq_token_cache, tmp_path, monkeypatch):
    """online.reference without online.judge: every evaluation logs FD in the extractor's features (the FID
    Inception by default; here a cheap stand-in) against statistics kept in the run directory, with the grid."""
    import json

    from arvision.cli import main
    from arvision.metrics import extractors

    asked = []
    monkeypatch.setattr(extractors, "build_extractor", lambda spec, device="cpu": asked.append(spec) or ColourMoments())
    run = tmp_path / "gen"
    main(["heptapod", "train", "--data", str(vq_token_cache), "--out", str(run), "train.max_steps=2",
          "train.batch_size=8", "train.eval_every=1", "online.num_per_class=1", "online.reference=synthetic",
          "online.num_ref=32", "sample.num_per_class=0", "model.args.depth=1", "model.args.head_depth=1",
          "objective.timesteps_per_image=2"])
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert asked == ["fid-helper"] and evals and evals[-1]["step"] == 2
    assert all(set(r) == {"step", "split", "fd"} and np.isfinite(r["fd"]) for r in evals), evals
    assert (run / "online_reference_stats.npz").is_file() and (run / "samples" / "step_00000002.png").is_file()
