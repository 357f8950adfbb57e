"""Segmentation: sliding-window inference (window placement, count map, averaging, equality with whole-image
inference), flip TTA, the RoPE path for inputs larger than the backbone's img_size, segmentor save/load, the
objective's checks and layer-decay groups, a 2-process evaluation equal to one process, and the
`arvision segment train | eval | predict` commands end to end (mIoU well above chance) with their one-line errors."""
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from arvision.checkpoints import load_model, save_model
from arvision.cli import main
from arvision.data import build_segmentation_dataset, seg_eval_transform
from arvision.eval.segmentation import evaluate_segmentation, inference, slide_logits, window_starts
from arvision.models import create_model
from arvision.models.segmentation import Segmentor, SegmentorConfig
from arvision.objectives.segmentation import SegmentationObjective
from arvision.checkpoints import load_segmentor
from arvision.train.engine import check_param_groups

TINY_BB = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, qk_norm="affine", rope_rescale=None)


def tiny_segmentor(head="upernet", num_classes=5, **kw):
    torch.manual_seed(0)
    return Segmentor(SegmentorConfig(backbone=TINY_BB, num_classes=num_classes, head=head, out_indices=[0, 1, 2, 3],
                                     channels=16, aux_channels=8, **kw))


class PerPixel(nn.Module):
    """A 1x1 conv: exactly translation- and flip-equivariant, so windows agree wherever they overlap."""

    def __init__(self, k=5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        return self.conv(x)


def test_window_starts_follow_mmseg():
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(300, 512, 341) == [0]          # smaller than the window: one window clipped to the image
    assert window_starts(683, 512, 341) == [0, 171]     # the last window is flush with the border
    assert window_starts(1200, 512, 341) == [0, 341, 682, 688]


def test_count_map_and_averaging():
    x = torch.randn(2, 3, 700, 530)
    ones = lambda t: torch.ones(t.shape[0], 3, *t.shape[-2:])  # noqa: E731
    avg, count = slide_logits(ones, x, 3, 512, 341)
    assert torch.equal(avg, torch.ones_like(avg))
    expected = torch.zeros(700, 530)
    for y in window_starts(700, 512, 341):
        for xx in window_starts(530, 512, 341):
            expected[y:y + 512, xx:xx + 512] += 1
    assert torch.equal(count[0, 0], expected) and count.max() == 4
    offs = []  # every window is a full 512x512 crop, each image once per window
    def where(t):  # noqa: E306
        offs.append(t.shape)
        return torch.zeros(t.shape[0], 1, *t.shape[-2:])
    slide_logits(where, x, 1, 512, 341, batch_size=2)
    windows = len(window_starts(700, 512, 341)) * len(window_starts(530, 512, 341))
    assert all(s[-2:] == (512, 512) for s in offs) and sum(s[0] for s in offs) == 2 * windows


def test_slide_equals_whole():
    model = PerPixel().eval()
    x = torch.randn(2, 3, 37, 29)
    whole = inference(model, x, "whole", num_classes=5)
    slide = inference(model, x, "slide", crop=16, stride=10, num_classes=5)     # overlapping windows
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-6)
    flipped = inference(model, x, "slide", crop=16, stride=10, flip=True, num_classes=5)
    torch.testing.assert_close(flipped, whole, rtol=1e-5, atol=1e-6)            # a per-pixel model is flip-equivariant
    seg = tiny_segmentor().eval()
    y = torch.randn(1, 3, 40, 36)
    torch.testing.assert_close(inference(seg, y, "slide", crop=48, stride=32), inference(seg, y, "whole"))
    ms = inference(seg, y, "whole", ratios=(0.5, 1.0))
    assert ms.shape == (1, 5, 40, 36) and torch.allclose(ms.sum(1), torch.ones(1, 40, 36))


def test_larger_inputs_use_rope_without_interpolation():
    seg = tiny_segmentor().eval()
    assert not any("pos" in k for k in seg.state_dict())  # no grid-sized position parameters to interpolate
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    with torch.no_grad():
        out = seg(torch.randn(2, 3, 96, 72))            # 24x18 patch grid on a 32 px (8x8) backbone
        odd = seg(torch.randn(1, 3, 50, 45))            # padded to 52x48 inside, cropped back
    assert out.shape == (2, 5, 96, 72) and odd.shape == (1, 5, 50, 45) and out.isfinite().all()
    assert all(torch.equal(before[k], v) for k, v in seg.state_dict().items())
    # a patch-14 backbone trained at 224 on a 512 crop (37x37 grid after padding to 518)
    p14 = Segmentor(SegmentorConfig(backbone=dict(TINY_BB, img_size=224, patch_size=14, depth=2),
                                    num_classes=3, head="linear"))
    with torch.no_grad():
        grid = p14.backbone.forward_intermediates(p14.pad(torch.randn(1, 3, 512, 512)), [1], intermediates_only=True)[0]
        logits = p14.eval()(torch.randn(1, 3, 512, 512))
    assert grid.shape[-2:] == (37, 37) and logits.shape == (1, 3, 512, 512)


def test_segmentor_save_load_round_trip(tmp_path):
    seg = tiny_segmentor(classes=list("abcde"), palette=[[i, 0, 0] for i in range(5)]).eval()
    save_model(seg, tmp_path / "seg")
    back = load_segmentor(tmp_path / "seg")
    assert back.config == seg.config and back.config.classes == list("abcde")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), seg(x), rtol=0, atol=0)
    assert isinstance(load_model(tmp_path / "seg", family="segmentor"), Segmentor)
    with pytest.raises(ValueError, match="segmentor checkpoint, not nepa_vit"):
        load_model(tmp_path / "seg", family="nepa_vit")
    save_model(create_model("nepa_tiny_patch4_32"), tmp_path / "vit")
    with pytest.raises(ValueError, match="is a nepa_vit checkpoint, not a segmentor"):
        load_segmentor(tmp_path / "vit")


def test_from_backbone_keeps_the_pretrained_weights():
    bb = create_model("nepa_tiny_patch4_32", depth=4)
    seg = Segmentor.from_backbone(bb, num_classes=4, head="linear")
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in seg.backbone.state_dict().items())


def test_objective_checks_and_layer_decay_groups():
    seg = tiny_segmentor()
    obj = SegmentationObjective(seg, llrd=0.5, head_lr_scale=10.0)
    with pytest.raises(ValueError, match="do not match images"):
        obj(torch.randn(2, 3, 32, 32), torch.zeros(2, 16, 16, dtype=torch.long))
    masks = torch.randint(0, 5, (2, 32, 32))
    masks[:, :4] = 255
    loss, metrics = obj(torch.randn(2, 3, 32, 32), masks)
    assert loss.isfinite() and set(metrics) == {"decode_loss", "aux_loss", "pixel_acc", "all_ignored"}
    torch.testing.assert_close(loss, metrics["decode_loss"] + 0.4 * metrics["aux_loss"])
    groups = obj.param_groups(1e-4, 0.05, 10)
    check_param_groups(obj, groups)
    factor = {id(p): (g["lr_base"], g["lr_scale"]) for g in groups for p in g["params"]}
    L = 4
    for i, blk in enumerate(seg.backbone.blocks):
        assert all(factor[id(p)] == (1e-4, 0.5 ** (L - i)) for p in blk.parameters())
    assert factor[id(seg.backbone.patch_embed.weight)] == (1e-4, 0.5 ** (L + 1))
    assert factor[id(seg.decode_head.cls.conv_seg.weight)] == (pytest.approx(1e-3), 1.0)


def _eval_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ds = build_segmentation_dataset("synthetic", "val", seg_eval_transform(), img_size=32, num_samples=7)
    res = evaluate_segmentation(tiny_segmentor(num_classes=11), ds, 11, crop=24, stride=16, rank=rank,
                                world_size=world)
    torch.save(res, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_two_process_evaluation_equals_one_process(tmp_path):
    ds = build_segmentation_dataset("synthetic", "val", seg_eval_transform(), img_size=32, num_samples=7)
    one = evaluate_segmentation(tiny_segmentor(num_classes=11), ds, 11, crop=24, stride=16)
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2)
    for rank in range(2):
        two = torch.load(tmp_path / f"res.{rank}", weights_only=False)
        assert two["n"] == one["n"] == 7  # 7 images on 2 ranks: the padding repeat is not counted
        for k in ("mIoU", "mAcc", "aAcc"):
            assert two[k] == pytest.approx(one[k], abs=1e-9)
        assert two["IoU"] == one["IoU"]


def _write_folder(root, n_train=48, n_val=8, classes=("background", "red", "blue"), bad_mask=False, bad_label=False):
    """A generic segmentation folder: noisy grey backgrounds with a red and a blue rectangle, masks as class indices."""
    rng = np.random.default_rng(0)
    entries = [{"name": c, "color": [40 * i, 200 - 40 * i, 90]} for i, c in enumerate(classes)]
    (root / "classes.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(entries))
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(60, 140, (32, 32, 1)).repeat(3, 2).astype(np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            for label, colour in ((1, (220, 30, 30)), (2, (30, 30, 220))):
                y, x = rng.integers(0, 20, 2)
                h, w = rng.integers(6, 13, 2)
                img[y:y + h, x:x + w], mask[y:y + h, x:x + w] = colour, label
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            if bad_mask and split == "val" and i == 0:
                mask = mask[:16, :16]
            if bad_label and split == "val" and i == 0:
                mask[0, 0] = 9
            Image.fromarray(mask).save(root / "annotations" / split / f"{i}.png")
    return root


def _fails(argv, capsys, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("arvision: error:") and match in err and "\n" not in err, err


def test_segment_train_eval_predict_commands(tmp_path, capsys):
    data = _write_folder(tmp_path / "data")
    run = tmp_path / "run"
    main(["segment", "train", "--data", str(data), "--out", str(run), "train.max_steps=120", "train.batch_size=8",
          "train.lr=3e-3", "train.warmup_steps=5", "segment.llrd=null", "segment.drop_path_rate=0.0",
          "train.precision=fp32", "data.num_workers=0", "data.photometric=false", "train.log_every=10",
          "model.backbone_args={depth: 2, embed_dim: 32, num_heads: 2}", "model.args={channels: 16, aux_channels: 8}"])
    res = json.loads((run / "results.json").read_text())
    final = res["final"]
    # chance: everything "background" gives mIoU = background share / 3 (about 27 here)
    assert final["mIoU"] > 60, final
    assert set(final["IoU"]) == {"background", "red", "blue"}
    capsys.readouterr()
    main(["segment", "eval", str(run / "best"), "--data", str(data), "--json", str(tmp_path / "eval.json"),
          "--num-workers", "0"])
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["mIoU"] == pytest.approx(final["mIoU"], abs=1e-6) and again["crop"] == 32
    flip = tmp_path / "flip.json"
    main(["segment", "eval", str(run / "best"), "--data", str(data), "--flip", "--ratios", "0.75,1.0",
          "--mode", "whole", "--json", str(flip), "--num-workers", "0"])
    assert json.loads(flip.read_text())["mIoU"] > 50
    img = data / "images" / "val" / "0.png"
    main(["segment", "predict", str(run / "best"), "--images", str(img), "--out", str(tmp_path / "pred")])
    overlay = Image.open(tmp_path / "pred" / "0_overlay.png")
    labels = np.asarray(Image.open(tmp_path / "pred" / "0_labels.png"))
    assert overlay.size[0] > 32 and labels.shape == (32, 32) and set(np.unique(labels)) <= {0, 1, 2}
    # bad input: one line each
    other = _write_folder(tmp_path / "four", 2, 2, ("background", "red", "blue", "green"))
    _fails(["segment", "eval", str(run / "best"), "--data", str(other)], capsys,
           "has 4 classes but the segmentor's head predicts 3")
    _fails(["segment", "predict", str(run / "best"), "--images", str(img), "--out", str(tmp_path / "p2"),
            "--classes", str(other / "classes.json")], capsys, "has 4 classes but the segmentor's head predicts 3")
    bad = _write_folder(tmp_path / "bad", 2, 2, bad_mask=True)
    _fails(["segment", "eval", str(run / "best"), "--data", str(bad), "--num-workers", "0"], capsys,
           "masks must match their image")
    bad = _write_folder(tmp_path / "badlabel", 2, 2, bad_label=True)
    _fails(["segment", "eval", str(run / "best"), "--data", str(bad), "--num-workers", "0"], capsys,
           "has labels 9 outside 0..2")
    save_model(create_model("nepa_tiny_patch4_32"), tmp_path / "vit")
    _fails(["segment", "eval", str(tmp_path / "vit"), "--data", str(data)], capsys, "not a segmentor")


def test_ddp_training_two_processes(tmp_path):
    """2 gloo processes: UperNet leaves the backbone's final norm unused (frozen, or DDP fails on step 2)."""
    import subprocess
    import sys
    data = _write_folder(tmp_path / "data", 8, 2)
    port = str(29500 + os.getpid() % 1000 + 700)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "-m",
           "arvision", "segment", "train", "--data", str(data), "--out", str(tmp_path / "run"), "train.max_steps=3",
           "train.batch_size=8", "data.num_workers=0", "train.precision=fp32", "train.log_every=1",
           "model.backbone_args={depth: 2, embed_dim: 32, num_heads: 2}", "model.args={channels: 16, aux_channels: 8}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["steps"] == 3 and res["final"]["n"] == 2
