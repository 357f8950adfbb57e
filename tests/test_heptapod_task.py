"""`arvision heptapod train` on a token cache and `arvision sample`, end to end, and their one-line errors."""
import json

import numpy as np
import pytest
import yaml
import torch

import arvision
from arvision.cli import main
from arvision.data.token_cache_writer import build_token_cache
from arvision.generate.outputs import class_labels


@pytest.fixture(scope="module")
def cache(vq_token_cache):
    return vq_token_cache


def test_train_then_sample(cache, tmp_path, capsys):
    run = tmp_path / "gen"
    main(["heptapod", "train", "--data", str(cache), "--out", str(run), "train.max_steps=3", "train.batch_size=8",
          "sample.num_per_class=1", "model.args.depth=2", "model.args.head_depth=1", "objective.timesteps_per_image=2"])
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 3 and results["samples"]["count"] == 10
    samples = np.load(run / "samples.npz")
    assert samples["arr_0"].shape == (10, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
    # written in a seeded random class order (not 0, 1, ..., 9), so evaluators that split in file order see every class
    assert sorted(samples["arr_1"].tolist()) == list(range(10)) and samples["arr_1"].tolist() != list(range(10))
    assert samples["arr_1"].tolist() == class_labels(range(10), 1, seed=0).tolist()
    ckpt = run / "checkpoints" / "step_00000003"
    model = arvision.load_model(ckpt, family="heptapod")
    assert model.config.codebook_size == arvision.create_model("vq_f4_32px").codebook_size
    assert model.config.grid_size == 8 and model.config.depth == 2
    # sampling from the checkpoint finds the tokenizer through the run's token cache
    main(["sample", str(ckpt), "--out", str(tmp_path / "s"), "--num-per-class", "2", "--classes", "1,4"])
    out = np.load(tmp_path / "s" / "samples.npz")
    assert out["arr_0"].shape == (4, 32, 32, 3) and out["arr_1"].tolist() == class_labels([1, 4], 2, seed=0).tolist()
    again = tmp_path / "s2"
    main(["sample", str(ckpt), "--out", str(again), "--num-per-class", "2", "--classes", "1,4", "--no-cache"])
    assert np.array_equal(np.load(again / "samples.npz")["arr_0"], out["arr_0"])  # the cache changes nothing


def test_final_samples_come_from_the_ema_weights_when_kept(cache, tmp_path):
    """With train.ema_decay > 0 the run's final samples (and their score) are drawn from the EMA weights, as MAR and
    DiT sample: they equal `arvision sample CKPT --ema` and differ from the raw weights' samples."""
    run = tmp_path / "gen"
    main(["heptapod", "train", "--data", str(cache), "--out", str(run), "train.max_steps=4", "train.batch_size=8",
          "train.ema_decay=0.5", "train.lr=1e-2", "sample.num_per_class=1", "model.args.depth=1",
          "model.args.head_depth=1", "objective.timesteps_per_image=2"])
    results = json.loads((run / "results.json").read_text())
    assert results["samples"]["weights"] == "ema"
    ckpt = run / "checkpoints" / "step_00000004"
    for flag, out in ((["--ema"], tmp_path / "ema"), ([], tmp_path / "raw")):
        main(["sample", str(ckpt), "--out", str(out), "--num-per-class", "1", *flag])
    final = np.load(run / "samples.npz")["arr_0"]
    assert np.array_equal(final, np.load(tmp_path / "ema" / "samples.npz")["arr_0"])
    assert not np.array_equal(final, np.load(tmp_path / "raw" / "samples.npz")["arr_0"])


def test_sample_class_order_is_seeded_and_mixed():
    """`arvision sample` / `heptapod train` write samples in this order: every class equally often, shuffled by the
    sampling seed, so any window of the file (an IS split, a first-N subset) holds about every class."""
    labels = class_labels(range(10), 20, seed=0)
    assert torch.bincount(labels).tolist() == [20] * 10
    assert all(len(labels[i:i + 20].unique()) >= 5 for i in range(0, 200, 20))  # grouped: one class per window
    assert torch.equal(labels, class_labels(range(10), 20, seed=0))
    assert not torch.equal(labels, class_labels(range(10), 20, seed=1))


def test_one_line_errors(cache, tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit):
            main(argv)
        msg = capsys.readouterr().err.strip()
        assert msg.startswith("arvision: error:") and "\n" not in msg
        return msg

    msg = error(["heptapod", "train", "--data", str(cache), "--out", str(tmp_path / "a"), "model.args.codebook_size=7"])
    assert "contradicts the token cache" in msg and not (tmp_path / "a").exists()
    msg = error(["heptapod", "train", "--out", str(tmp_path / "q"), "quickstart.tokenizer_precision=fp16"])
    assert "quickstart.tokenizer_precision" in msg and "bf16, fp32" in msg and not (tmp_path / "q").exists()
    assert "not a token cache" in error(["heptapod", "train", "--data", str(tmp_path), "--out", str(tmp_path / "b")])
    nepa = arvision.save_model(arvision.create_model("nepa_tiny_patch4_32"), tmp_path / "nepa")
    assert "not heptapod" in error(["sample", str(nepa), "--out", str(tmp_path / "d")])
    gen = arvision.save_model(arvision.create_model("heptapod_tiny", depth=1, head_depth=1), tmp_path / "gen")
    assert "out of range" in error(["sample", str(gen), "--out", str(tmp_path / "e"), "--classes", "3,10",
                                    "--tokenizer", str(cache / "tokenizer")])
    assert "no tokenizer found" in error(["sample", str(gen), "--out", str(tmp_path / "f")])
    # a generator trained on another tokenizer's cache (another codebook size) cannot continue on this one
    other = arvision.save_model(arvision.create_model("heptapod_tiny", codebook_size=64, depth=1, head_depth=1),
                                tmp_path / "other")
    msg = error(["heptapod", "train", "--data", str(cache), "--out", str(tmp_path / "g"), f"model.init={other}"])
    assert "does not fit the token cache" in msg and "codebook_size" in msg


def test_eval_nll_is_the_held_out_next_token_cross_entropy(cache, tmp_path, capsys):
    """`arvision eval nll` scores -log p(x_t | x_<t, y) of every position of every grid (the unflipped copy) through
    the prediction sampling uses; a cache from another tokenizer or of continuous latents is a one-line error."""
    import torch.nn.functional as F

    from arvision.data.token_cache import TokenCache

    tc = TokenCache(cache)
    tokens = torch.from_numpy(np.asarray(tc.tokens[tc.index, 0]).astype(np.int64))
    labels = torch.from_numpy(np.asarray(tc.labels[tc.index]).astype(np.int64))
    heads = {"global": ["objective.timesteps_per_image=2"],  # and the next-token baseline, which has no 2D head
             "none": ["model.args.head_type=none", "objective.target_set=next", "objective.timesteps_per_image=0"]}
    for head, overrides in heads.items():
        run = tmp_path / f"gen_{head}"
        main(["heptapod", "train", "--data", str(cache), "--out", str(run), "train.max_steps=2", "train.batch_size=8",
              "sample.num_per_class=0", "model.args.depth=1", "model.args.head_depth=1", "train.lr=1e-2", *overrides])
        ckpt = run / "checkpoints" / "step_00000002"
        main(["eval", "nll", str(ckpt), "--data", str(cache), "--batch-size", "5", "--out", str(tmp_path / "nll.json")])
        res = json.loads((tmp_path / "nll.json").read_text())
        model = arvision.load_model(ckpt, family="heptapod").eval()
        with torch.no_grad():
            states = model.forward_backbone(tokens, labels)
            z = states if head == "none" else torch.stack([model.predict(states, t) for t in range(64)], dim=1)
            ce = F.cross_entropy(model.logits(z).flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
        assert res["num_grids"] == len(tc) == 24
        assert res["nll"] == pytest.approx(ce.mean().item(), rel=1e-5)
        assert res["by_row"] == pytest.approx(ce.mean(0).view(8, 8).mean(1).tolist(), rel=1e-5)
        assert "next-token NLL" in capsys.readouterr().out
    ckpt = tmp_path / "gen_global" / "checkpoints" / "step_00000002"

    torch.manual_seed(1)  # the same architecture, other weights: codes that mean other things
    other_tok = arvision.create_model("vq_f4_32px").eval()
    build_token_cache(other_tok, "synthetic", tmp_path / "other", img_size=32, limit=4, num_workers=0, progress=False)
    kl = arvision.create_model("kl_f4_32px").eval()
    build_token_cache(kl, "synthetic", tmp_path / "kl", img_size=32, limit=4, num_workers=0, progress=False)
    for data, expected in ((tmp_path / "other", "another tokenizer"), (tmp_path / "kl", "discrete codes")):
        with pytest.raises(SystemExit):
            main(["eval", "nll", str(ckpt), "--data", str(data)])
        msg = capsys.readouterr().err.strip()
        assert msg.startswith("arvision: error:") and "\n" not in msg and expected in msg
    # a latent generator's run reports its per-row loss too (the diffusion loss of the posterior means)
    main(["heptapod", "train", "--data", str(tmp_path / "kl"), "--out", str(tmp_path / "klgen"), "train.max_steps=1",
          "train.batch_size=4", "sample.num_per_class=0", "model.args.depth=1", "model.args.head_depth=1",
          "objective.timesteps_per_image=2"])
    by_row = json.loads((tmp_path / "klgen" / "results.json").read_text())["next_loss_by_row"]
    assert len(by_row) == 8 and all(0 < v < 10 for v in by_row)


def test_backbone_initialised_from_nepa(tmp_path):
    from arvision.tasks.heptapod import init_backbone_from_nepa

    nepa = arvision.create_model("nepa_tiny_patch4_32")
    path = arvision.save_model(nepa, tmp_path / "nepa")
    gen = arvision.create_model("heptapod_tiny", qk_norm="affine", layerscale=1e-5, norm_eps=1e-12)
    init_backbone_from_nepa(gen, path)
    for (name, p), q in zip(gen.backbone.blocks.named_parameters(), nepa.blocks.parameters()):
        assert torch.equal(p, q), name
    narrow = arvision.create_model("heptapod_tiny", embed_dim=96)
    with pytest.raises(ValueError, match="does not fit the generator backbone"):
        init_backbone_from_nepa(narrow, path)


def test_cache_limit_takes_a_random_subset_of_a_class_sorted_folder(tmp_path):
    from PIL import Image

    from arvision.data.token_cache import TokenCache

    for c in range(3):
        (tmp_path / "data" / "train" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (80 * c, 10 * i, 0)).save(tmp_path / "data" / "train" / f"c{c}" / f"{i}.png")
    tok = arvision.create_model("vq_f4_32px").eval()
    build_token_cache(tok, tmp_path / "data", tmp_path / "cache", img_size=32, limit=6, num_workers=0, progress=False)
    labels = sorted(int(TokenCache(tmp_path / "cache")[i][1]) for i in range(6))
    assert len(set(labels)) == 3  # not the first six images (two classes of a class-sorted folder)


@pytest.mark.slow
def test_generation_quickstart_chain(tmp_path, capsys):
    """`arvision heptapod train` with no data: tokenizer, token cache, judge, generator with online evaluation, samples
    and the score line, on a tiny budget; --resume reuses every finished stage and rewrites the same score."""
    run = tmp_path / "q"
    tiny = ["quickstart.num_images=64", "quickstart.tokenizer_steps=2", "quickstart.tokenizer_batch=16",
            "quickstart.judge_steps=2", "train.max_steps=4", "sample.num_per_class=2",
            "online.num_ref=40", "train.batch_size=16", "model.args.depth=1", "model.args.head_depth=1",
            "sample.batch_size=20", "train.eval_every=1"]
    main(["heptapod", "train", "--out", str(run), *tiny])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("sample accuracy ") and "(classifier on real held-out images " in line and "FD-judge" in line
    results = json.loads((run / "results.json").read_text())
    score = results["score"]
    assert 0 <= score["sample_accuracy"] <= 1 and 0 <= score["judge_real_accuracy"] <= 1
    assert score["num_samples"] == 20 and score["num_ref"] == 40 and np.isfinite(score["fd"])
    for stage in ("perceptual_net/checkpoints/step_00000002", "tokenizer/results.json", "cache/header.json",
                  "judge/checkpoints/step_00000002", "samples.png", "checkpoints/step_00000004"):
        assert (run / stage).exists(), stage
    assert json.loads((run / "cache" / "header.json").read_text())["copies"] == 1  # no mirrored digits
    online = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in online if r.get("split") == "eval"]
    assert online and all("sample_accuracy" in r and "fd" in r for r in online), online
    assert sorted(p.name for p in (run / "samples").glob("step_*.png"))[-1] == "step_00000004.png"
    # the generator's sample grids and the tokenizer's reconstruction grids, as files and as TensorBoard images
    tok_online = [json.loads(r) for r in (run / "tokenizer" / "metrics.jsonl").read_text().splitlines()]
    tok_online = [r for r in tok_online if r.get("split") == "eval"]
    assert tok_online and all(0 < r["psnr"] < 60 and 0 < r["codebook_usage"] <= 1 for r in tok_online), tok_online
    tok_config = yaml.safe_load((run / "tokenizer" / "config.yaml").read_text())
    # the perceptual network, not the judge
    assert tok_config["objective"]["perceptual_net"].endswith("perceptual_net/checkpoints/step_00000002")
    assert tok_config["objective"]["perceptual_weight"] == 0.1
    assert tok_config["train"]["precision"] == "bf16"
    assert any("perceptual" in json.loads(r) for r in (run / "tokenizer" / "metrics.jsonl").read_text().splitlines())
    assert (run / "tokenizer" / "samples" / "step_00000002.png").is_file()
    for directory, tag, last in ((run, "eval/samples", 4), (run / "tokenizer", "eval/reconstructions", 2)):
        images = tensorboard_images(directory / "tb", tag)
        assert images and images[-1].step == last and images[-1].width > 0, (directory, tag)
    tok_mtime = (run / "tokenizer" / "results.json").stat().st_mtime
    main(["heptapod", "train", "--out", str(run), "--resume", *tiny])
    assert (run / "tokenizer" / "results.json").stat().st_mtime == tok_mtime
    again = json.loads((run / "results.json").read_text())["score"]
    assert again["sample_accuracy"] == score["sample_accuracy"] and again["fd"] == pytest.approx(score["fd"])


def tensorboard_images(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"images": 0})
    events.Reload()
    return events.Images(tag) if tag in events.Tags()["images"] else []
