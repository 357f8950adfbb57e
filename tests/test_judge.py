"""The judge task (`arvision judge train`): a classifier of real images trained by the one Trainer that scores samples
and serves as a tokenizer's perceptual network."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from arvision.cli import main
from arvision.eval.judge import judge_accuracy, load_judge
from arvision.tasks.judge import judge_transform


def test_a_judge_of_the_digits_learns_them_and_reports_its_held_out_accuracy(tmp_path, capsys):
    run = tmp_path / "judge"
    main(["judge", "train", "--out", str(run), "data.num_samples=1024", "data.num_workers=0", "train.max_steps=40",
          "train.warmup_steps=3", "eval.num_images=300"])
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 40 and results["num_classes"] == 10 and results["eval_images"] == 300
    assert results["top1"] > 50, results  # chance is 10%
    # the reported number is the judge's accuracy through the extractor that scores samples
    judge = load_judge(results["checkpoint"])
    assert judge_accuracy(judge, "synthetic-digits", "val", 300) == pytest.approx(results["top1"] / 100)
    # a finished run resumed does nothing and returns its results
    main(["judge", "train", "--out", str(run), "--resume"])
    assert json.loads((run / "results.json").read_text()) == results


def test_judge_augmentations_crop_with_padding_and_mirror():
    image = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3) % 251)
    plain = judge_transform(32)(image)
    assert plain.shape == (3, 32, 32) and plain.min() >= -1 and plain.max() <= 1
    torch.testing.assert_close(judge_transform(32, hflip=1.0)(image), plain.flip(-1))
    torch.manual_seed(0)
    shifted = [judge_transform(32, crop_padding=4)(image) for _ in range(8)]
    assert any(not torch.equal(s, plain) for s in shifted)  # some crops move the image
    assert all(s.shape == plain.shape for s in shifted)
    assert judge_transform(16)(image).shape == (3, 16, 16)  # larger images are centre-cropped to img_size


def test_judge_refuses_a_model_that_is_not_a_classifier_and_a_folder_of_one_class(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["judge", "train", "--out", str(tmp_path / "a"), "model.name=nepa_tiny_patch4_32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "timm_classifier" in err[0], err
    for split in ("train", "val"):
        (tmp_path / "one" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "one" / split / "cat" / "0.png")
    with pytest.raises(SystemExit):
        main(["judge", "train", "--data", str(tmp_path / "one"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 2" in err[0], err
    assert not (tmp_path / "b").exists()  # nothing written for a run that cannot start
