"""Ignored pixels (issue 15, items 8 and 9): a micro-batch whose pixels are all ignored adds zero loss (not NaN) and
training goes on; one configurable ignore index is used by the dataset, the transforms' padding, the loss and the
metric, and an ignore index inside the class range is a one-line error."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from arvision.cli import main
from arvision.config import load_config
from arvision.data import build_segmentation_dataset, seg_train_transform
from arvision.metrics import ConfusionMatrix
from arvision.models.segmentation import IGNORE_INDEX, Segmentor, SegmentorConfig
from arvision.objectives.segmentation import SegmentationObjective
from arvision.train.distributed import DistEnv
from arvision.train.engine import Trainer

TINY_BB = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, rope_rescale=None)


def tiny_segmentor(head="upernet", num_classes=5, **kw):
    torch.manual_seed(0)
    return Segmentor(SegmentorConfig(backbone=TINY_BB, num_classes=num_classes, head=head, out_indices=[0, 1, 1, 1],
                                     channels=8, aux_channels=8, **kw))


@pytest.mark.parametrize("head", ["upernet", "linear"])
def test_an_all_ignored_batch_adds_zero_loss_and_is_counted(head):
    obj = SegmentationObjective(tiny_segmentor(head))
    images = torch.randn(2, 3, 32, 32)
    loss, metrics = obj(images, torch.full((2, 32, 32), IGNORE_INDEX))
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert all(torch.isfinite(v) for v in metrics.values()), metrics
    assert metrics["all_ignored"].item() == 1.0
    loss.backward()  # a graph with zero gradients, not NaN ones
    grads = [p.grad for p in obj.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)
    # a batch with labelled pixels: the same mean over them as cross_entropy's, not counted as ignored
    masks = torch.randint(0, 5, (2, 32, 32))
    masks[0] = IGNORE_INDEX
    obj.zero_grad()
    loss, metrics = obj(images, masks)
    logits, _ = obj.model(images, return_aux=True)
    want = torch.nn.functional.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(metrics["decode_loss"], want)
    assert metrics["all_ignored"].item() == 0.0


class SometimesUnlabelled(Dataset):
    """Random images; masks of the even-numbered samples are all ignore_index, the odd ones hold random labels."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        mask = torch.full((32, 32), IGNORE_INDEX) if i % 2 == 0 else torch.randint(0, 5, (32, 32), generator=g)
        return torch.randn(3, 32, 32, generator=g), mask


def test_training_goes_on_through_all_ignored_batches(tmp_path):
    cfg = load_config("segment", overrides=["train.max_steps=4", "train.batch_size=4", "train.micro_batch_size=2",
                                            "train.log_every=1", "train.precision=fp32", "train.ckpt_every=0"]).train
    # the sampler shuffles: 2-image micro-batches of even indices come up in 4 steps with this seed (checked below)
    obj = SegmentationObjective(tiny_segmentor())
    Trainer(obj, SometimesUnlabelled(), cfg, tmp_path, DistEnv(), num_workers=0).fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in train), train
    assert sum(r["all_ignored"] for r in train) > 0  # some micro-batch had no labelled pixel, and it was counted


# ------------------------------------------------------------------------------------------ item 9: the index
def test_one_ignore_index_from_the_config_reaches_every_part(tmp_path):
    # dataset: a generic folder whose void pixels hold 7 (not 255), 3 classes
    root = tmp_path / "data"
    (root / "classes.json").parent.mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps(["background", "red", "blue"]))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(8):
            image = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            mask = rng.integers(0, 3, (32, 32)).astype(np.uint8)
            mask[:4] = 7
            Image.fromarray(mask).save(root / "annotations" / split / f"{i}.png")
    ds = build_segmentation_dataset(root, "train", ignore_index=7)
    assert ds.ignore_index == 7 and set(ds[0][1].unique().tolist()) == {0, 1, 2, 7}
    with pytest.raises(Exception, match="labels 7 outside"):  # with the default 255, 7 is not a label
        build_segmentation_dataset(root, "train")._labels(np.full((2, 2), 7), "m.png")
    # the padding of the joint transforms uses it
    tf = seg_train_transform(48, scale=(32, 32), ratio_range=(1.0, 1.0), photometric=False, hflip=0, ignore_index=7)
    _, mask = tf(Image.new("RGB", (32, 32)), np.zeros((32, 32), np.int64))
    assert mask.shape == (48, 48) and (mask[32:] == 7).all() and (mask[:32, :32] == 0).all()
    # the loss and the metric
    obj = SegmentationObjective(tiny_segmentor(num_classes=3, ignore_index=7), ignore_index=7)
    loss, metrics = obj(torch.randn(2, 3, 32, 32), torch.full((2, 32, 32), 7))
    assert loss.item() == 0.0 and metrics["all_ignored"].item() == 1.0
    cm = ConfusionMatrix(3, ignore_index=7).update(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 7, 7, 1]]))
    assert cm.mat.sum().item() == 2
    # end to end: training and evaluating with segment.ignore_index=7 on that folder
    run = tmp_path / "run"
    main(["segment", "train", "--data", str(root), "--out", str(run), "segment.ignore_index=7", "train.max_steps=2",
          "train.batch_size=4", "data.num_workers=0", "train.precision=fp32", "data.crop_size=48",
          "data.scale=[32, 32]", "model.backbone_args={depth: 2, embed_dim: 32, num_heads: 2}",
          "model.args={channels: 8, aux_channels: 8}", "eval.max_samples=2"])
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 2 and np.isfinite(res["final"]["aAcc"])
    from arvision.checkpoints import load_segmentor
    from arvision.tasks.segment import evaluate_checkpoint
    assert load_segmentor(run / "best").config.ignore_index == 7  # the checkpoint remembers it for eval
    again = evaluate_checkpoint(run / "best", str(root), num_workers=0, max_samples=2)
    assert again["aAcc"] == pytest.approx(res["final"]["aAcc"], abs=1e-6)


def test_synthetic_data_and_padding_take_a_negative_ignore_index(tmp_path):
    main(["segment", "train", "--out", str(tmp_path / "run"), "segment.ignore_index=-1", "train.max_steps=1",
          "train.batch_size=2", "data.num_workers=0", "train.precision=fp32", "data.num_samples=4",
          "data.crop_size=40", "model.backbone_args={depth: 2, embed_dim: 32, num_heads: 2}",
          "model.args={channels: 8, aux_channels: 8}", "eval.max_samples=2"])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 1
    # ratio 1: the 32 px image is padded to 40 (a random ratio of up to 2 would crop it instead)
    ds = build_segmentation_dataset("synthetic", "train", seg_train_transform(40, scale=(32, 32), ratio_range=(1, 1),
                                                                              ignore_index=-1),
                                    num_samples=2, ignore_index=-1)
    mask = ds[0][1]
    assert ds.ignore_index == -1 and (mask[32:] == -1).all() and not (mask == 255).any()


def _one_line_error(argv, capsys, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and match in err and "\n" not in err, err


def test_an_ignore_index_inside_the_class_range_is_a_one_line_error(tmp_path, capsys):
    _one_line_error(["segment", "train", "--out", str(tmp_path / "a"), "segment.ignore_index=0"], capsys,
                    "ignore_index=0 is inside the class range 0..10")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="ignore_index=255 is inside the class range 0..299"):
        SegmentorConfig(backbone=TINY_BB, num_classes=300)
    with pytest.raises(ValueError, match="ignore_index=255 is inside the class range 0..299"):
        ConfusionMatrix(300)
    with pytest.raises(ValueError, match="ignore_index=3 is inside the class range 0..10"):
        build_segmentation_dataset("synthetic", "val", ignore_index=3)
    seg = SegmentorConfig(backbone=TINY_BB, num_classes=300, ignore_index=65535)
    assert seg.ignore_index == 65535
