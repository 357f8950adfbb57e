import io
import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from arvision.data import (
    HFDiskDataset, ImageFolderDataset, SyntheticShapes, build_dataset, center_crop_arr, eval_transform,
    finetune_transform, generation_transform, pretrain_transform, resolve_split,
)
from arvision.data.synthetic import render_shape

# ---------------------------------------------------------------- synthetic


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_synthetic_deterministic_and_splits_differ():
    a, b = SyntheticShapes(50, split="train"), SyntheticShapes(500, split="train")
    assert b.targets[:50] == a.targets  # sample i does not depend on num_samples
    for i in (0, 7, 49):
        img, label = a[i]
        assert img.mode == "RGB" and img.size == (32, 32) and label == a.targets[i]
        assert np.array_equal(_px(img), _px(a[i][0])) and np.array_equal(_px(img), _px(b[i][0]))
    for other in (SyntheticShapes(50, split="val"), SyntheticShapes(50, split="test"), SyntheticShapes(50, seed=1)):
        assert other.targets != a.targets
        assert all(np.abs(_px(a[i][0]) - _px(other[i][0])).mean() > 5 for i in range(5))
    assert SyntheticShapes(4, img_size=48)[0][0].size == (48, 48)
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes(4, split="valid")


def test_synthetic_labels_balanced_and_images_textured():
    ds = SyntheticShapes(1000, split="val")
    assert np.bincount(ds.targets, minlength=10).tolist() == [100] * 10
    assert len(ds.classes) == 10 and len(set(ds.classes)) == 10
    stds = [_px(ds[i][0]).std() for i in range(40)]
    assert min(stds) > 8
    tensor, label = SyntheticShapes(4, transform=T.ToTensor())[3]
    assert tensor.shape == (3, 32, 32) and isinstance(label, int)


def test_synthetic_label_changes_only_the_shape():
    # The label only selects the outline; every other draw (background, colour, pose) comes from the same rng stream,
    # so two classes rendered from one seed differ exactly where their shapes differ.
    imgs = [_px(render_shape(np.random.default_rng(3), c, 32)) for c in range(10)]
    for a in range(10):
        for b in range(a + 1, 10):
            changed = (np.abs(imgs[a] - imgs[b]).max(-1) > 20).sum()
            assert 4 <= changed < 32 * 32 * 0.8, (SyntheticShapes.classes[a], SyntheticShapes.classes[b], changed)


# ---------------------------------------------------------------- image folders

COLOURS = {"ant": (250, 20, 20), "bee": (20, 20, 250)}  # the class is readable from the pixels


def _png(path, colour):
    Image.new("RGB", (8, 8), colour).save(path)


@pytest.fixture
def tree(tmp_path):
    """train/{ant,bee} with 4 good PNGs each, one corrupt PNG and one truncated JPEG; test/ with 2 good images."""
    for split, n in (("train", 4), ("test", 1)):
        for name, colour in COLOURS.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                _png(tmp_path / split / name / f"{i}.png", colour)
    (tmp_path / "train" / "ant" / "1_corrupt.png").write_bytes(np.random.default_rng(0).bytes(300))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "train" / "bee" / "2_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "train" / "bee" / "notes.txt").write_text("not an image")
    return tmp_path


def _label_of(pixels: torch.Tensor) -> int:
    return 0 if pixels[0].mean() > pixels[2].mean() else 1


def test_image_folder_skips_bad_files_in_workers(tree):
    ds = ImageFolderDataset(tree / "train", transform=T.ToTensor())
    assert ds.classes == ["ant", "bee"] and len(ds) == 10 and ds.targets == [s[1] for s in ds.samples]
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, shuffle=True)
    for _ in range(2):
        seen = 0
        for x, y in loader:
            assert x.shape == (5, 3, 8, 8)
            assert y.tolist() == [_label_of(img) for img in x]  # a replacement keeps its own label
            seen += len(y)
        assert seen == 10
    assert ds.num_skipped == 2  # counted in the workers, visible here, each bad file once


def test_image_folder_replacement_and_warning_once(tree, caplog):
    ds = ImageFolderDataset(tree / "train")
    bad = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("1_corrupt.png"))
    with caplog.at_level(logging.WARNING, logger="arvision.data"):
        img, label = ds[bad]
        again = ds[bad]
    assert [r.name for r in caplog.records] == ["arvision.data"]
    assert "1_corrupt.png" in caplog.records[0].getMessage()
    assert ds.num_skipped == 1 and np.array_equal(_px(img), _px(ds[bad + 1][0])) and label == ds[bad + 1][1]
    assert np.array_equal(_px(again[0]), _px(img))


def test_image_folder_all_unreadable(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"garbage")
    (tmp_path / "a" / "y.png").write_bytes(b"")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(RuntimeError, match="no readable image"):
        ds[0]


def test_build_dataset_errors(tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass a folder with train/"):
        build_dataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        build_dataset(tree / "train" / "ant" / "0.png")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found under"):
        build_dataset(tmp_path / "empty")
    (tmp_path / "empty" / "train" / "cls").mkdir()
    (tmp_path / "empty" / "train" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images found under"):
        build_dataset(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"split 'val' not found .*splits found: train"):
        build_dataset(tmp_path / "empty", "val")
    with pytest.raises(ValueError, match="splits found: none"):
        build_dataset(tree / "train", "train")  # a class-folder tree without split folders
    with pytest.raises(ValueError, match="split must be one of"):
        resolve_split(tree, "holdout")


def test_split_fallback_and_aliases(tree):
    assert resolve_split(tree, "train") == "train"
    assert resolve_split(tree, "val") == "test" and resolve_split(tree, "test") == "test"
    ds = build_dataset(tree, "val")
    assert isinstance(ds, ImageFolderDataset) and ds.root == tree / "test" and len(ds) == 2
    (tree / "test").rename(tree / "validation")
    assert resolve_split(tree, "test") == "validation" and resolve_split(tree, "val") == "validation"
    syn = build_dataset("synthetic", "val", img_size=16, num_samples=20)
    assert isinstance(syn, SyntheticShapes) and len(syn) == 20 and syn.split == "val" and syn[0][0].size == (16, 16)
    assert len(build_dataset("synthetic")) == 10000 and len(build_dataset("synthetic", "test")) == 2000


# ---------------------------------------------------------------- Hugging Face save_to_disk


def _png_bytes(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return buf.getvalue()


def test_hf_save_to_disk_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["ant", "bee"]),
                                  "extra": datasets.Value("string")})
    colours = [COLOURS["ant"], COLOURS["bee"], None, COLOURS["bee"], COLOURS["ant"]]
    rows = {"img": [{"bytes": _png_bytes(c) if c else b"\x89PNG broken", "path": None} for c in colours],
            "fine_label": [0, 1, 0, 1, 0], "extra": ["x"] * 5}
    train = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(train=train, validation=train.select([1, 4])).save_to_disk(str(tmp_path / "dd"))

    assert resolve_split(tmp_path / "dd", "val") == "validation"
    assert resolve_split(tmp_path / "dd", "test") == "validation"
    ds = build_dataset(tmp_path / "dd", "train", transform=T.PILToTensor())
    assert isinstance(ds, HFDiskDataset) and ds.image_key == "img" and ds.label_key == "fine_label"
    assert ds.classes == ["ant", "bee"] and ds.targets == [0, 1, 0, 1, 0] and len(ds) == 5
    items = [ds[i] for i in range(5)]
    assert [y for _, y in items] == [0, 1, 1, 1, 0]  # row 2 is corrupt: replaced by row 3
    assert torch.equal(items[0][0], torch.tensor(COLOURS["ant"], dtype=torch.uint8)[:, None, None].expand(3, 8, 8))
    assert ds.num_skipped == 1
    with pytest.raises(ValueError, match="available splits: train, validation"):
        HFDiskDataset(tmp_path / "dd", "test")

    train.select([0, 1]).save_to_disk(str(tmp_path / "single"))
    single = build_dataset(tmp_path / "single", "train")
    assert len(single) == 2 and single[1][1] == 1 and single[1][0].size == (8, 8)
    with pytest.raises(ValueError, match="splits found: train"):
        build_dataset(tmp_path / "single", "val")


def test_hf_hub_name_is_read_through_load_dataset(tmp_path, monkeypatch):
    """--data hf://NAME: datasets.load_dataset(NAME) (here a local data folder, offline; on a machine with the Hub,
    owner/name), as a map-style dataset (the sampler resumes it exactly, as a folder)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee"])})
    colours = [COLOURS["ant"], COLOURS["bee"]] * 6
    rows = {"image": [{"bytes": _png_bytes(c), "path": None} for c in colours], "label": [0, 1] * 6}
    data = tmp_path / "hub_data" / "data"
    data.mkdir(parents=True)
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(data / "train-00000-of-00001.parquet"))
    ds.select(range(4)).to_parquet(str(data / "test-00000-of-00001.parquet"))
    source = f"hf://{tmp_path / 'hub_data'}"
    assert resolve_split(source, "val") == "test"
    train = build_dataset(source, "train", transform=T.PILToTensor())
    assert isinstance(train, HFDiskDataset) and train.classes == ["ant", "bee"] and len(train) == 12
    assert train[1][1] == 1 and torch.equal(
        train[1][0], torch.tensor(COLOURS["bee"], dtype=torch.uint8)[:, None, None].expand(3, 8, 8))
    with pytest.raises(FileNotFoundError, match="could not be loaded"):
        build_dataset(f"hf://{tmp_path / 'nothing_here'}", "train")


def test_hf_missing_dependency_message(tmp_path, monkeypatch):
    (tmp_path / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'arvision\[hf\]'"):
        build_dataset(tmp_path, "train")


# ---------------------------------------------------------------- transforms


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_pretrain_transform():
    tf = pretrain_transform(32)
    crop = tf.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.interpolation == InterpolationMode.BILINEAR
    assert crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3) and crop.antialias
    img = _noise_image(64, 48)
    torch.manual_seed(0)
    x = tf(img)
    torch.manual_seed(0)
    assert torch.equal(x, tf(img))  # deterministic under torch.manual_seed
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert not torch.equal(x, tf(img))  # a different random crop
    assert torch.all(tf(Image.new("RGB", (40, 40), (255, 255, 255))) == 1)
    assert torch.all(tf(Image.new("RGB", (40, 40), (0, 0, 0))) == -1)


def test_eval_transform_resize_rules():
    img = _noise_image(400, 300)
    tf = eval_transform(224)
    assert tf.transforms[0].size == 256 and tf.transforms[0].interpolation == InterpolationMode.BICUBIC
    assert tf.transforms[0](img).size == (341, 256)  # shorter side to 256, aspect kept
    assert tf(img).shape == (3, 224, 224)
    warp = eval_transform(224, crop_pct=0.95)
    assert warp.transforms[0](img).size == (235, 235)  # official square warp
    assert warp(img).shape == (3, 224, 224)
    small = _noise_image(32, 32)
    assert torch.equal(eval_transform(32)(small), (T.ToTensor()(small) - 0.5) / 0.5)  # CIFAR stays intact
    assert eval_transform(224, resize=300).transforms[0](img).size == (400, 300)


def test_finetune_transform():
    torch.manual_seed(0)
    x = finetune_transform(32)(_noise_image(40, 40))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    names = [type(t).__name__ for t in finetune_transform(224).transforms]
    assert names[:3] + names[4:] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment",
                                     "Normalize", "RandomErasing"]  # nepa_spec.md 5.2: no colour jitter next to RandAugment
    crop, _, ra, _, norm, erase = finetune_transform(224).transforms
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    assert ra.num_layers == 2 and all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)
    assert erase.probability == 0.25 and erase.mode == "pixel" and norm.mean.tolist() == [0.5] * 3


def test_generation_transform_gives_uint8_centre_crops():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))
    x = generation_transform(32)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(generation_transform(32, flip=True)(img), x.flip(-1))
    small = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert torch.equal(generation_transform(32)(small), torch.from_numpy(np.array(small)).permute(2, 0, 1))
    big = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # ADM: box-halved (2x2 means), not bicubic
    out = np.asarray(center_crop_arr(Image.fromarray(big), 32)).astype(float)
    assert np.abs(out - big.reshape(32, 2, 32, 2, 3).mean((1, 3))).max() <= 1
    # the crop is centred: a 32x96 image keeps columns 32..63
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, 32:64] = 200
    assert (generation_transform(32)(Image.fromarray(wide)) == 200).all()


def test_labelled_subset_is_class_balanced_and_fixed():
    from torch.utils.data import Dataset

    from arvision.data import labelled_subset

    class Labelled(Dataset):
        classes = ["a", "b", "c"]
        targets = [i % 3 for i in range(300)]

        def __len__(self):
            return 300

        def __getitem__(self, i):
            return i, self.targets[i]

    ds = Labelled()
    sub = labelled_subset(ds, 0.1)
    assert len(sub) == 30 and sorted(sub.targets) == [0] * 10 + [1] * 10 + [2] * 10
    assert [ds[i][1] for i in sub.indices] == sub.targets and sub.classes == ds.classes
    assert labelled_subset(ds, 0.1).indices == sub.indices and labelled_subset(ds, 0.1, seed=1).indices != sub.indices
    assert set(labelled_subset(ds, 0.02).indices) <= set(range(300)) and len(labelled_subset(ds, 0.001)) == 3
    assert labelled_subset(ds, None) is ds
    with pytest.raises(ValueError, match="label_fraction"):
        labelled_subset(ds, 1.5)


def test_synthetic_digits_are_deterministic_balanced_and_drawn():
    from arvision.data import SyntheticDigits

    ds = build_dataset("synthetic-digits", "train", img_size=32, num_samples=40)
    assert isinstance(ds, SyntheticDigits) and sorted(ds.targets[:10]) == list(range(10))
    a, b = np.asarray(ds[3][0]), np.asarray(SyntheticDigits(40)[3][0])
    assert np.array_equal(a, b) and a.shape == (32, 32, 3)
    assert not np.array_equal(a, np.asarray(SyntheticDigits(40, split="val")[3][0]))
    # the glyph is there: two colour populations far apart (foreground and background differ by >= 200 in sum)
    px = a.reshape(-1, 3).astype(float)
    far = np.abs(px[:, None] - px[None, ::7]).sum(-1).max()
    assert far > 150
    assert build_dataset("synthetic-digits", "val", num_samples=5)[0][1] in range(10)


# ---------------------------------------------------------------- image modes, hidden names, links (issue 15 items 2-4)


def _mode_files(folder) -> dict[str, tuple[int, int, int]]:
    """One 8 x 8 image per Pillow mode a user meets, each with the 8-bit RGB it must read as."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(folder / "i16.png")  # I;16: half of 65535
    Image.fromarray(np.full((8, 8), 32768, ">u2")).save(folder / "i16b.tif")  # I;16B
    (folder / "i32.pgm").write_bytes(b"P5 8 8 65535\n" + np.full(64, 32768, ">u2").tobytes())  # opens as mode I
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(folder / "f.tif")  # F, [0, 1]
    Image.fromarray(np.dstack([np.full((8, 8), 200, np.uint8), np.full((8, 8), 77, np.uint8)]), "LA").save(
        folder / "la.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(folder / "p_trns.png", transparency=0)
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(folder / "cmyk.tif")
    Image.new("RGBA", (8, 8), (30, 60, 90, 0)).save(folder / "rgba.png")  # alpha dropped, as torchvision / pytorch-fid
    Image.new("L", (8, 8), 77).save(folder / "l.png")
    Image.new("1", (8, 8), 1).save(folder / "bw.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "rgb.png")
    return {"i16.png": (128,) * 3, "i16b.tif": (128,) * 3, "i32.pgm": (128,) * 3, "f.tif": (128,) * 3,
            "la.png": (200,) * 3, "p_trns.png": (10, 200, 30), "cmyk.tif": (0, 255, 255), "rgba.png": (30, 60, 90),
            "l.png": (77,) * 3, "bw.png": (255,) * 3, "rgb.png": (1, 2, 3)}


def test_every_image_mode_reads_as_8bit_rgb_by_its_value_range(tmp_path):
    """A 16-bit PNG of value 32768 reads as 128 (not 255) in every reader: training folders, FID folders, dataset
    splits for `eval fid` / the token cache, segmentation images, the visualiser."""
    from arvision.data.segmentation import SegmentationFolder
    from arvision.eval.generative import open_images
    from arvision.eval.visualize import load_images

    expected = _mode_files(tmp_path / "data" / "train" / "modes")
    _mode_files(tmp_path / "data" / "val" / "modes")
    ds = ImageFolderDataset(tmp_path / "data" / "train")
    assert sorted(os.path.basename(p) for p, _ in ds.samples) == sorted(expected)
    for i, (path, _) in enumerate(ds.samples):
        img = ds[i][0]
        assert img.mode == "RGB" and tuple(np.asarray(img)[0, 0]) == expected[os.path.basename(path)], path
    folder = open_images(tmp_path / "data" / "train" / "modes")  # an `eval fid` image folder
    split = open_images(tmp_path / "data", "val")  # a dataset split (as `eval fid` and the token cache read it)
    for reader in (folder, split):
        got = sorted(tuple(reader[i][:, 0, 0].tolist()) for i in range(len(reader)))
        assert got == sorted(expected.values())
    seg = tmp_path / "seg"
    _mode_files(seg / "images")
    (seg / "masks").mkdir()
    for name in expected:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(seg / "masks" / (os.path.splitext(name)[0] + ".png"))
    seg_ds = SegmentationFolder(seg / "images", seg / "masks", ["a", "b"])
    for i, (path, _) in enumerate(seg_ds.samples):
        assert tuple(seg_ds[i][0][:, 0, 0].tolist()) == expected[os.path.basename(path)], path
    x = load_images([tmp_path / "data" / "train" / "modes" / "i16.png"], 8)  # normalised with mean = std = 0.5
    assert x[0, :, 0, 0].tolist() == pytest.approx([(128 / 255 - 0.5) / 0.5] * 3, abs=1e-6)


def _class_tree(root, classes, n, colour=(250, 20, 20)):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _png(root / c / f"{i}.png", colour)


def _seg_tree(seg, n):
    """images/a/{0..n-1}.png with all-zero masks (ignored under reduce_zero_label)."""
    _class_tree(seg / "images", ["a"], n)
    (seg / "masks" / "a").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(seg / "masks" / "a" / f"{i}.png")


def test_hidden_names_are_not_data_and_class_lists_must_match(tmp_path):
    """An empty `train/.ipynb_checkpoints` is not class 0, `.ipynb_checkpoints/*-checkpoint.png` and `.x.png` are not
    images (classes, FID folders, segmentation images); splits whose class folders differ are a one-line error."""
    from arvision.data.segmentation import SegmentationFolder
    from arvision.eval.generative import open_images

    root = tmp_path / "data"
    _class_tree(root / "train", ["airplane", "ship"], 3)
    _class_tree(root / "val", ["airplane", "ship"], 1)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "val" / ".ipynb_checkpoints" / "x").mkdir(parents=True)
    (root / "train" / "ship" / ".ipynb_checkpoints").mkdir()
    _png(root / "train" / "ship" / ".ipynb_checkpoints" / "0-checkpoint.png", (1, 2, 3))
    _png(root / "train" / "airplane" / ".hidden.png", (1, 2, 3))
    train, val = build_dataset(root, "train"), build_dataset(root, "val")
    assert train.classes == val.classes == ["airplane", "ship"]
    assert len(train) == 6 and not any("/." in p for p, _ in train.samples)
    assert len(open_images(root / "train")) == 6  # an `eval fid` folder: 6 images, not 8
    seg = tmp_path / "seg"
    _seg_tree(seg, 2)
    _png(seg / "images" / "a" / ".0.png", (1, 2, 3))  # no mask: skipped, not an error
    (seg / "images" / ".ipynb_checkpoints").mkdir()
    _png(seg / "images" / ".ipynb_checkpoints" / "0-checkpoint.png", (1, 2, 3))
    assert len(SegmentationFolder(seg / "images", seg / "masks", ["a", "b", "c"], reduce_zero_label=True)) == 2
    # class lists that differ between splits would shift the labels of one of them: refused, naming the classes
    _class_tree(root / "train", ["cat"], 1)
    for split in ("train", "val"):
        with pytest.raises(ValueError) as err:
            build_dataset(root, split)
        msg = str(err.value)
        assert "\n" not in msg and "cat" in msg and "train" in msg and "val" in msg and "airplane" not in msg


def test_links_list_each_real_file_once_and_never_leave_the_root(tmp_path, caplog):
    """`train/cat/loop -> .` and `train/dog/up -> ../..` must not multiply the data or pull val images into train:
    each real file is listed once, links that loop, name a listed file again or lead into another split of the
    dataset root are skipped and counted in the log; an empty class folder is a warning."""
    from arvision.data.segmentation import SegmentationFolder
    from arvision.eval.generative import open_images

    root = tmp_path / "data"
    _class_tree(root / "train", ["cat", "dog"], 4)
    _class_tree(root / "val", ["cat", "dog"], 5, colour=(20, 20, 250))
    (root / "train" / "empty").mkdir()
    (root / "val" / "empty").mkdir()
    os.symlink(".", root / "train" / "cat" / "loop")
    os.symlink("../..", root / "train" / "dog" / "up")
    os.symlink(root / "val", root / "train" / "dog" / "val_link")  # into another split of the dataset root
    os.symlink("../cat/0.png", root / "train" / "dog" / "alias.png")  # a second name of a listed file
    os.symlink("../val", root / "train" / "val_class")  # another split as a class folder
    with caplog.at_level(logging.WARNING, logger="arvision.data"):
        ds = build_dataset(root, "train")
    real = sorted(str(p) for p in (root / "train").glob("*/[0-9].png"))
    assert sorted(p for p, _ in ds.samples) == real and len(ds) == 8 and ds.classes == ["cat", "dog", "empty"]
    log = " ".join(r.getMessage() for r in caplog.records)
    assert "5 symbolic links" in log and "2 looping" in log and "1 naming" in log and "2 leading into another split" \
        in log and "empty" in log
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="arvision.data"):
        assert len(open_images(root, "train")) == 8  # a dataset split as `eval fid` and the token cache read it
    assert "5 symbolic links" in " ".join(r.getMessage() for r in caplog.records)
    # an `eval fid` folder given by itself has no other split: a link leaving it is a linked subset, read once
    assert len(open_images(root / "train")) == 8 + 10
    seg = tmp_path / "seg"
    _seg_tree(seg, 2)
    os.symlink(".", seg / "images" / "a" / "loop")
    os.symlink("..", seg / "images" / "a" / "up")
    os.symlink(seg / "masks", seg / "images" / "a" / "masks")  # into the segmentation root, outside the images
    assert len(SegmentationFolder(seg / "images", seg / "masks", ["a", "b", "c"], reduce_zero_label=True,
                                  dataset_root=seg)) == 2


def test_links_to_linked_subsets_annex_and_hub_snapshots_are_followed(tmp_path, caplog):
    """Data built from links lists every real file once under its linked name: a class folder linked to a folder
    outside the dataset (an ImageNet subset), files linked into a hidden `.git/annex/objects` inside the dataset root
    or outside it (git-annex / DataLad) and into `../blobs` (a Hugging Face hub snapshot); a dangling link and a link
    from the linked folder back above the dataset are skipped and counted."""
    from arvision.data.segmentation import SegmentationFolder
    from arvision.eval.generative import open_images

    root = tmp_path / "data"
    _class_tree(root / "train", ["cat"], 2)
    _class_tree(root / "val", ["cat", "dog"], 1)
    _class_tree(tmp_path / "imagenet" / "train", ["n02085620"], 3, colour=(20, 250, 20))  # outside the root
    os.symlink(tmp_path / "imagenet" / "train" / "n02085620", root / "train" / "dog")
    os.symlink(root, tmp_path / "imagenet" / "train" / "n02085620" / "back")  # a loop through the linked folder
    annex_in = root / ".git" / "annex" / "objects" / "Xk" / "MD5E-s1--a1.png"
    annex_out = tmp_path / "store" / ".git" / "annex" / "objects" / "pQ" / "SHA256-s1--b2"
    blob = tmp_path / "hub" / "blobs" / "c3d4"
    for path, colour in ((annex_in, (1, 2, 3)), (annex_out, (4, 5, 6)), (blob, (7, 8, 9))):
        path.parent.mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(path, format="PNG")
    os.symlink(os.path.relpath(annex_in, root / "train" / "cat"), root / "train" / "cat" / "annexed.png")
    os.symlink(annex_out, root / "train" / "cat" / "stored.png")
    os.symlink(blob, root / "train" / "cat" / "snapshot.png")
    os.symlink(tmp_path / "gone.png", root / "train" / "cat" / "dangling.png")
    with caplog.at_level(logging.WARNING, logger="arvision.data"):
        ds = build_dataset(root, "train")
    assert ds.classes == ["cat", "dog"]
    names = sorted((os.path.relpath(p, root / "train"), label) for p, label in ds.samples)
    assert names == [("cat/0.png", 0), ("cat/1.png", 0), ("cat/annexed.png", 0), ("cat/snapshot.png", 0),
                     ("cat/stored.png", 0), ("dog/0.png", 1), ("dog/1.png", 1), ("dog/2.png", 1)]
    colours = {os.path.basename(p): tuple(np.asarray(ds[i][0])[0, 0]) for i, (p, _) in enumerate(ds.samples)}
    assert colours["annexed.png"] == (1, 2, 3) and colours["stored.png"] == (4, 5, 6) and colours["snapshot.png"] \
        == (7, 8, 9)
    log = " ".join(r.getMessage() for r in caplog.records)
    assert "2 symbolic links" in log and "1 dangling" in log and "1 looping" in log
    assert len(open_images(root, "train")) == 8 and len(open_images(root / "train")) == 8  # `eval fid` folders
    seg = tmp_path / "seg"
    _seg_tree(seg, 2)
    os.symlink(blob, seg / "images" / "a" / "2.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(seg / "masks" / "a" / "2.png")
    assert len(SegmentationFolder(seg / "images", seg / "masks", ["a", "b", "c"], reduce_zero_label=True)) == 3
