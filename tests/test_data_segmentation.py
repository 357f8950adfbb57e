"""Segmentation data: joint image + mask transforms (alignment, labels, cat_max_ratio, photometric distortion),
ADE20K / generic folders / synthetic segmentation datasets and their bad-input errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from arvision.data import (
    ADE20KDataset, DataError, SyntheticSegmentation, build_segmentation_dataset, read_class_list, seg_eval_transform,
    seg_train_transform,
)
from arvision.data.segmentation_transforms import (
    PhotoMetricDistortion, RandomCropCatMax, _scale_saturation, rescale_size,
)

PALETTE = np.array([(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)], np.float32)


def _block_scene(rng, h=70, w=90):
    """A mask of random rectangles (classes 0..3) and an image whose pixel colour encodes the class."""
    mask = np.zeros((h, w), np.uint8)
    for c in (1, 2, 3, 1, 2):
        y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
        mask[y:y + rng.integers(10, 40), x:x + rng.integers(10, 50)] = c
    return Image.fromarray(PALETTE[mask].astype(np.uint8)), mask


def test_joint_transform_keeps_the_mask_aligned_with_the_image():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tf = seg_train_transform(crop_size=48, scale=(160, 48), photometric=False, mean=(0, 0, 0), std=(1, 1, 1))
    padded_seen = flipped_or_scaled = 0
    for _ in range(30):
        image, mask = _block_scene(rng)
        x, y = tf(image, mask)
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and y.shape == (48, 48) and y.dtype == torch.int64
        pad = y == 255
        if pad.any():  # padding: a bottom / right band, image 0 there
            padded_seen += 1
            rows, cols = (~pad).any(1), (~pad).any(0)
            h, w = int(rows.sum()), int(cols.sum())
            assert rows[:h].all() and cols[:w].all() and pad[h:].all() and pad[:, w:].all()
            assert (x[:, pad] == 0).all()
        colour_class = torch.from_numpy(
            np.linalg.norm(x.permute(1, 2, 0).numpy()[..., None, :] * 255 - PALETTE, axis=-1).argmin(-1))
        # interior pixels (uniform 5x5 neighbourhood in the mask, not at the crop border, where the blur reaches
        # outside the crop): the image colour is exactly the mask class
        yf = y.float()[None, None]
        uniform = (torch.nn.functional.max_pool2d(yf, 5, 1, 2) == torch.nn.functional.max_pool2d(-yf, 5, 1, 2).neg())
        inner = torch.zeros_like(pad)
        inner[2:-2, 2:-2] = uniform[0, 0, 2:-2, 2:-2]
        inner &= ~pad
        assert (colour_class[inner] == y[inner]).all()
        # everywhere (blurred boundaries included) the disagreement is a thin edge
        assert (colour_class[~pad] != y[~pad]).float().mean() < 0.06
        flipped_or_scaled += int(not pad.any())
    assert padded_seen > 3 and flipped_or_scaled > 3  # both small (padded) and large (cropped) scales were drawn


def test_train_masks_stay_integer_with_valid_labels():
    torch.manual_seed(1)
    ds = SyntheticSegmentation(20, img_size=32, split="val", transform=seg_train_transform(32, (128, 32)))
    seen = set()
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
        seen |= set(y.unique().tolist())
    assert seen <= set(range(11)) | {255} and len(seen - {255}) >= 5


def test_random_crop_respects_cat_max_ratio_when_possible():
    # a 32x200 scene: class 1 in columns 100..119, class 0 elsewhere. A 32x32 crop has no class above 75% for only
    # about 21% of the offsets; with 10 retries about 92% of crops should satisfy the ratio.
    mask = torch.zeros(32, 200, dtype=torch.int64)
    mask[:, 100:120] = 1
    mask[:4, :] = 255  # ignored pixels do not count
    image = tv_tensors.Image(torch.zeros(3, 32, 200, dtype=torch.uint8))

    def rate(ratio):
        torch.manual_seed(0)
        ok = 0
        for _ in range(300):
            _, m = RandomCropCatMax(32, ratio)(image, tv_tensors.Mask(mask))
            assert m.shape == (32, 32)
            counts = torch.bincount(m[m != 255].flatten(), minlength=2)
            ok += int((counts > 0).sum() > 1 and counts.max() < 0.75 * counts.sum())
        return ok / 300

    assert rate(0.75) > 0.85 and rate(1.0) < 0.35
    torch.manual_seed(0)  # impossible (one class): still a crop of the right size
    img, m = RandomCropCatMax(16, 0.75)(image, tv_tensors.Mask(torch.zeros(32, 200, dtype=torch.int64)))
    assert img.shape == (3, 16, 16) and m.shape == (16, 16)


def test_photometric_distortion_as_mmseg_and_mask_untouched():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    img = torch.from_numpy(arr).permute(2, 0, 1)
    pmd = PhotoMetricDistortion()
    off = {"brightness": None, "contrast_first": True, "contrast": None, "saturation": None, "hue": None}
    # brightness: add, clip, truncate; contrast: multiply, clip, truncate (mmseg's convert)
    out = pmd.transform(tv_tensors.Image(img), {**off, "brightness": 20.7, "contrast": 1.3})
    ref = np.clip(np.clip(arr.astype(np.float32) + 20.7, 0, 255).astype(np.uint8).astype(np.float32) * 1.3, 0, 255)
    assert torch.equal(out.permute(1, 2, 0), torch.from_numpy(ref.astype(np.uint8)))
    # saturation: scaling the HSV saturation (reference: PIL's uint8 HSV round trip)
    for factor in (0.5, 1.5):
        hsv = np.asarray(Image.fromarray(arr).convert("HSV")).astype(np.float32)
        hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0, 255)
        ref = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(int)
        diff = np.abs(_scale_saturation(img, factor).permute(1, 2, 0).numpy().astype(int) - ref)
        assert diff.max() <= 8 and diff.mean() < 1.5  # PIL quantises hue to 256 levels
    torch.manual_seed(0)
    mask = tv_tensors.Mask(torch.randint(0, 5, (40, 40)))
    changed = 0
    for _ in range(10):
        o, m = pmd(tv_tensors.Image(img), mask)
        assert torch.equal(m, mask) and o.dtype == torch.uint8
        changed += int(not torch.equal(o, img))
    assert changed >= 7
    with pytest.raises(ValueError, match="uint8"):
        pmd(tv_tensors.Image(img.float()))


def test_eval_transform_and_rescale():
    arr = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = np.random.default_rng(1).integers(0, 150, (37, 53))
    x, y = seg_eval_transform()(Image.fromarray(arr), mask)
    assert torch.allclose(x, torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1, atol=1e-6)
    assert torch.equal(y, torch.from_numpy(mask))
    with pytest.raises(ValueError, match="does not match"):
        seg_eval_transform()(Image.fromarray(arr), mask[:30])
    # mmcv keep-ratio rescale: (2048, 512) bounds the long side by 2048 and the short side by 512
    assert rescale_size(375, 500, (2048, 512)) == (512, 683) and rescale_size(100, 3000, (2048, 512)) == (68, 2048)


def test_synthetic_segmentation_masks_are_exact_and_deterministic():
    ds = SyntheticSegmentation(30, img_size=32, split="train")
    assert ds.num_classes == 11 and ds.classes[0] == "background" and len(ds.palette) == 11
    x, y = ds[3]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y.dtype == torch.int64 and y.shape == (32, 32)
    assert torch.equal(ds[3][1], y) and torch.equal(ds[3][0], x)
    assert not torch.equal(SyntheticSegmentation(30, split="val")[3][1], y)
    shape_pixels, fractions = 0, []
    for i in range(30):
        x, y = ds[i]
        img = x.permute(1, 2, 0).float()
        yf = y.float()[None, None]
        interior = (torch.nn.functional.max_pool2d(yf, 3, 1, 1) == -torch.nn.functional.max_pool2d(-yf, 3, 1, 1))[0, 0]
        for c in y.unique().tolist():
            shape_pixels += int((y == c).sum()) if c else 0
            region = img[(y == c) & interior]
            if c == 0 or len(region) < 4:
                continue
            # a shape is one colour (+ noise of std <= 12): inside it, pixels lie close to their median colour
            # (a mask shifted by one pixel drops this to 0.57 for some shapes)
            fractions.append(((region - region.median(0).values).norm(dim=-1) < 60).float().mean().item())
    assert min(fractions) > 0.95 and np.mean(fractions) > 0.99 and len(fractions) > 30
    assert shape_pixels > 30 * 32 * 32 * 0.1


def _write_ade(root, n=3, size=(24, 16)):
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            ann = rng.integers(0, 151, (size[1], size[0])).astype(np.uint8)
            ann[0, :3] = (0, 1, 150)
            Image.fromarray(ann).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")


def test_ade20k_layout_and_reduce_zero_label(tmp_path):
    _write_ade(tmp_path)
    ds = build_segmentation_dataset(tmp_path, "val")
    assert isinstance(ds, ADE20KDataset) and ds.split == "validation" and len(ds) == 3 and ds.num_classes == 150
    assert ds.classes[0] == "wall" and ds.classes[-1] == "flag" and len(ds.palette) == 150
    raw = np.asarray(Image.open(tmp_path / "annotations" / "validation" / "ADE_validation_00000001.png")).astype(int)
    x, y = ds[1]
    assert x.shape == (3, 16, 24) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y[0, :3].tolist() == [255, 0, 149]
    assert torch.equal(y, torch.from_numpy(np.where(raw == 0, 255, raw - 1)))
    x, y = build_segmentation_dataset(tmp_path, "train", seg_train_transform(16, (48, 16)))[0]
    assert x.shape == (3, 16, 16) and set(y.unique().tolist()) <= set(range(150)) | {255}
    loader = torch.utils.data.DataLoader(ADE20KDataset(tmp_path, "train", seg_eval_transform()), batch_size=3)
    xb, yb = next(iter(loader))
    assert xb.shape == (3, 3, 16, 24) and yb.shape == (3, 16, 24)


def test_ade20k_bad_input_one_line_errors_and_corrupt_skipping(tmp_path):
    _write_ade(tmp_path)
    ann = tmp_path / "annotations" / "training"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(ann / "ADE_training_00000001.png")
    with pytest.raises(DataError, match=r"ADE_training_00000001\.png is 10x10 but its image .* is 24x16") as e:
        ADE20KDataset(tmp_path, "train")[1]
    assert "\n" not in str(e.value)
    Image.fromarray(np.full((16, 24), 200, np.uint8)).save(ann / "ADE_training_00000001.png")
    with pytest.raises(DataError, match=r"ADE_training_00000001\.png has labels 200 outside 0\.\.150"):
        ADE20KDataset(tmp_path, "train")[1]
    (ann / "ADE_training_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image .*ADE_training_00000001\.jpg has no mask"):
        ADE20KDataset(tmp_path, "train")
    (tmp_path / "images" / "training" / "ADE_training_00000001.jpg").unlink()
    (tmp_path / "images" / "training" / "ADE_training_00000000.jpg").write_bytes(b"not a jpeg")
    ds = ADE20KDataset(tmp_path, "train")
    x, y = ds[0]  # the corrupt sample is replaced by the next readable one
    assert ds.num_skipped == 1 and x.shape == (3, 16, 24)
    with pytest.raises(FileNotFoundError, match="images/test"):
        ADE20KDataset(tmp_path, "test")


def test_generic_folder_with_class_list(tmp_path):
    classes = [{"name": "road", "color": [128, 64, 128]}, {"name": "car", "color": [0, 0, 142]},
               {"name": "sky", "color": [70, 130, 180]}]
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    for d in ("images/train", "annotations/train", "images/val", "annotations/val"):
        (tmp_path / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (12, 20))
    labels[0, 0] = 255
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(tmp_path / "images/train/a.png")
    Image.fromarray(labels.astype(np.uint8)).save(tmp_path / "annotations/train/a.png")  # class indices
    colours = np.array([c["color"] for c in classes], np.uint8)[labels.clip(0, 2)]
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(tmp_path / "images/train/b.jpg")
    Image.fromarray(colours).save(tmp_path / "annotations/train/b.png")  # RGB colour mask
    ds = build_segmentation_dataset(tmp_path, "train")
    assert ds.classes == ["road", "car", "sky"] and ds.palette[1] == (0, 0, 142) and len(ds) == 2
    assert torch.equal(ds[0][1], torch.from_numpy(labels))
    assert torch.equal(ds[1][1], torch.from_numpy(labels.clip(0, 2)))
    bad = labels.copy()
    bad[3, 3], bad[4, 4] = 3, 7
    Image.fromarray(bad.astype(np.uint8)).save(tmp_path / "annotations/train/a.png")
    with pytest.raises(DataError, match=r"a\.png has labels 3, 7 outside 0\.\.2 \(3 classes\)"):
        build_segmentation_dataset(tmp_path, "train")[0]
    colours[0, 0] = (1, 2, 3)
    Image.fromarray(colours).save(tmp_path / "annotations/train/b.png")
    with pytest.raises(DataError, match=r"b\.png has colours \(1, 2, 3\) that are not in the class list"):
        build_segmentation_dataset(tmp_path, "train")[1]
    (tmp_path / "classes.csv").write_text("name,r,g,b\nroad,128,64,128\ncar,0,0,142\n")
    assert read_class_list(tmp_path / "classes.csv") == (["road", "car"], [(128, 64, 128), (0, 0, 142)])
    (tmp_path / "classes.json").unlink()
    (tmp_path / "classes.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no class list"):
        build_segmentation_dataset(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_segmentation_dataset(tmp_path / "nope", "train")
