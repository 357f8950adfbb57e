"""WebDataset shards (issue 20): `arvision data shard` writes them from an image folder, and every --data reads them
(a brace pattern or their folder) as an indexed dataset: the same images and labels as the folder, disjoint per-rank
samples, corrupt images skipped and counted, exact resume, one-line errors."""
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import arvision
from arvision.cli import main

pytest.importorskip("webdataset")  # the optional extra .[shards] (in .[dev]): patterns, the writer
from arvision.config import load_config
from arvision.data import build_dataset, pretrain_transform
from arvision.data.shard_writer import write_shards
from arvision.data.shards import ShardDataset
from arvision.objectives import NepaObjective
from arvision.train.checkpoint import checkpoint_dirs
from arvision.train.distributed import DistEnv
from arvision.train.engine import Trainer
from arvision.train.sampler import ResumableSampler
from interruptions import interrupt_after_step

CLASSES = ("bird", "cat", "dog")


def _image_folder(root, per_class=(12, 10), size=32, seed=0):
    """root/{train,test}/<class>/<i>.<png|jpg>: distinct random images, a few JPEGs and a name with dots."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                name = f"{i:03d}.v{i % 2}.png" if i % 5 == 4 else f"{i:03d}.{'jpg' if i % 3 == 0 else 'png'}"
                image.save(root / split / c / name)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("shards") / "images")


@pytest.fixture(scope="module")
def shards(folder):
    out = folder.parent / "wds"
    for split in ("train", "test"):
        write_shards(folder, out, split, shard_size=7)
    return out


def _by_key(dataset):
    """{'<class>/<stem>': (pixels, label)} of a dataset of PIL images."""
    items = {}
    for i in range(len(dataset)):
        image, label = dataset[i]
        key = dataset.key(i) if isinstance(dataset, ShardDataset) else None
        if key is None:
            path = Path(dataset.samples[i][0])  # the shard key: dots of the stem made '_'
            key = f"{path.parent.name}/{path.with_suffix('').name.replace('.', '_')}"
        items[key] = (np.asarray(image), label)
    return items


def one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    stderr = capsys.readouterr().err.strip()  # the log lines of the run before it, then the error on one line
    err = stderr.splitlines()[-1]
    assert e.value.code == 2 and err.startswith("arvision: error:") and "Traceback" not in stderr, stderr
    return err


def test_shard_command_writes_the_folder_and_reads_back_the_same_images_and_labels(tmp_path, capsys, caplog):
    src = _image_folder(tmp_path / "images", per_class=(6, 2))
    (src / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    (src / "train" / "cat" / ".hidden.png").write_bytes((src / "train" / "cat" / "000.jpg").read_bytes())
    with caplog.at_level(logging.WARNING, logger="arvision.data"):
        main(["data", "shard", str(src), str(tmp_path / "wds"), "--split", "all", "--shard-size", "4",
              "--workers", "1"])
    printed = capsys.readouterr().out
    assert "wrote 6 images of 3 classes in 2 shards" in printed and "wrote 18 images of 3 classes in 5 shards" in printed
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 1 unreadable image" in warnings[0] and "broken.png" in warnings[0]
    index = json.loads((tmp_path / "wds" / "train.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["classes"] == list(CLASSES)
    assert index["class_counts"] == {"bird": 6, "cat": 6, "dog": 6} and index["skipped"] == 1
    assert [s["url"] for s in index["shardlist"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [s["nsamples"] for s in index["shardlist"]] == [4, 4, 4, 4, 2]

    (src / "train" / "cat" / "broken.png").unlink()
    from_folder, from_shards = build_dataset(src, "train"), build_dataset(tmp_path / "wds", "train")
    assert from_shards.classes == from_folder.classes == list(CLASSES)
    a, b = _by_key(from_folder), _by_key(from_shards)
    assert a.keys() == b.keys() and len(b) == 18
    assert all(np.array_equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in a)
    # the original encoded bytes, under the file's extension: WebDataset's own reader sees the same samples
    import webdataset as wds
    samples = list(wds.WebDataset(str(tmp_path / "wds" / "train-{000000..000004}.tar"), shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(a)
    jpg = next(s for s in samples if s["__key__"] == "cat/000")
    assert jpg["jpg"] == (src / "train" / "cat" / "000.jpg").read_bytes() and jpg["cls"] == b"1"
    assert build_dataset(tmp_path / "wds", "val").classes == list(CLASSES)  # val falls back to test, as folders do
    (src / "ILSVRC2012_img_train.tar").write_bytes(b"")  # an image folder beside its archive is still one
    assert len(build_dataset(src, "train")) == 18


def test_a_brace_pattern_reads_its_shards_and_the_folder_reads_every_split(folder, shards, monkeypatch):
    everything = build_dataset(shards, "train")
    assert len(everything) == 36 and len(everything.shards) == 6
    two = build_dataset(f"{shards}/train-{{000001..000002}}.tar", "train")
    assert [p.name for p in two.shards] == ["train-000001.tar", "train-000002.tar"] and len(two) == 14
    assert {two.key(i) for i in range(len(two))} < {everything.key(i) for i in range(len(everything))}
    # the other split of a train pattern comes from the folder's index
    test = build_dataset(f"{shards}/train-{{000000..000001}}.tar", "val")
    assert len(test) == 30 and all(p.name.startswith("test-") for p in test.shards)
    # a relative pattern in the config is saved absolute, like a folder
    from arvision.tasks.common import absolute_paths
    monkeypatch.chdir(shards.parent)
    cfg = {"data": {"source": "wds/train-{000000..000005}.tar"}}
    absolute_paths(cfg)
    assert cfg["data"]["source"] == f"{shards}/train-{{000000..000005}}.tar"
    assert len(build_dataset(cfg["data"]["source"], "train")) == 36


def test_two_ranks_read_disjoint_samples_that_cover_the_epoch(shards):
    from torchvision.transforms import PILToTensor
    dataset = build_dataset(f"{shards}/train-{{000000..000005}}.tar", "train", transform=PILToTensor())
    seen = []
    for rank in (0, 1):
        sampler = ResumableSampler(len(dataset), global_batch=12, micro_batch=6, rank=rank, world_size=2, seed=3)
        seen.append([dataset.key(i) for i, _ in sampler])
    assert len(seen[0]) == len(seen[1]) == 18
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {dataset.key(i) for i in range(len(dataset))}
    # loader workers split a rank's samples further, each reading through its own open shards
    sampler = ResumableSampler(len(dataset), global_batch=12, micro_batch=6, rank=1, world_size=2, seed=3)
    from arvision.train.sampler import SeededDataset
    loader = torch.utils.data.DataLoader(SeededDataset(dataset), batch_size=6, sampler=sampler, num_workers=2)
    labels = torch.cat([y for _, y in loader]).tolist()
    assert labels == [dataset.targets[i] for i, _ in sampler]


def test_a_corrupt_image_inside_a_shard_is_skipped_and_counted(shards, tmp_path, caplog):
    import shutil
    damaged = tmp_path / "wds"
    shutil.copytree(shards, damaged)
    with tarfile.open(damaged / "train-000002.tar") as tar:
        member = next(m for m in tar if not m.name.endswith(".cls"))
    with open(damaged / "train-000002.tar", "r+b") as f:  # the image bytes overwritten in place
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)
    dataset = build_dataset(damaged, "train", transform=lambda im: np.asarray(im))
    bad = next(i for i in range(len(dataset)) if dataset.key(i) == member.name.rsplit(".", 1)[0])
    with caplog.at_level(logging.WARNING, logger="arvision.data"):
        image, label = dataset[bad]
        for i in range(len(dataset)):
            dataset[i]
    assert np.array_equal(image, dataset[bad + 1][0]) and label == dataset.targets[bad + 1]  # the next readable one
    assert dataset.num_skipped == 1
    skipped = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(skipped) == 1 and dataset.key(bad) in skipped[0] and "train-000002.tar" in skipped[0]


def _trainer(run_dir, data, num_workers, seed=0):
    torch.manual_seed(seed)
    model = arvision.create_model("nepa_tiny_patch4_32", depth=1)
    cfg = load_config("pretrain", overrides=[f"train.{k}={v}" for k, v in dict(
        max_steps=8, batch_size=8, blr=5e-3, log_every=1, ckpt_every=4, precision="fp32").items()])
    return Trainer(NepaObjective(model), data, cfg.train, run_dir, DistEnv(), num_workers=num_workers)


class _Recorded(ShardDataset):
    """Records the samples read (in the main process: num_workers=0)."""
    read: list = []

    def _load(self, index):
        _Recorded.read.append(self.key(index))
        return super()._load(index)


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_run_on_shards_interrupted_and_resumed_sees_the_same_samples(shards, tmp_path, num_workers):
    def data():
        base = build_dataset(shards, "train")
        return _Recorded(base.shards, base.classes, pretrain_transform(32))

    _Recorded.read = []
    _trainer(tmp_path / "full", data(), num_workers).fit()
    uninterrupted = list(_Recorded.read)

    _Recorded.read = []
    part = _trainer(tmp_path / "part", data(), num_workers)
    interrupt_after_step(part, 5)
    with pytest.raises(SystemExit, match="resume"):
        part.fit()
    assert [p.name for p in checkpoint_dirs(tmp_path / "part")][-1] == "step_00000005"
    before, _Recorded.read = list(_Recorded.read), []
    resumed = _trainer(tmp_path / "part", data(), num_workers, seed=123)
    resumed.resume()
    resumed.fit()
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert a.keys() == b.keys() == set(range(1, 9)) and all(a[s] == b[s] for s in a)
    if num_workers == 0:  # the samples read, in order: 5 steps before the stop, 3 after
        assert len(uninterrupted) == 8 * 8 and before + _Recorded.read == uninterrupted


def test_missing_shards_and_patterns_that_match_nothing_are_one_line_errors(shards, tmp_path, capsys):
    base = ["pretrain", "--out", str(tmp_path / "run"), "train.max_steps=1", "eval.knn=false"]
    err = one_line_error(base + ["--data", f"{shards}/train-{{000100..000199}}.tar"], capsys)
    assert "matches no file" in err
    err = one_line_error(base + ["--data", f"{shards}/train-{{000000..000009}}.tar"], capsys)
    assert "train-000006.tar is missing (4 of the 10 shards" in err
    import shutil
    partial = tmp_path / "partial"
    shutil.copytree(shards, partial)
    (partial / "train-000003.tar").unlink()
    err = one_line_error(base + ["--data", str(partial)], capsys)
    assert "train-000003.tar listed in" in err and "is missing" in err
    no_index = tmp_path / "no_index"
    no_index.mkdir()
    shutil.copy(shards / "train-000000.tar", no_index)
    err = one_line_error(base + ["--data", str(no_index)], capsys)
    assert "split 'train' not found" in err
    truncated = tmp_path / "truncated"
    shutil.copytree(shards, truncated)
    with open(truncated / "train-000001.tar", "r+b") as f:  # a copy cut short inside its fourth sample
        f.truncate(3 * 2 * 1024 + 700)
    err = one_line_error(base + ["--data", str(truncated)], capsys)
    assert "train-000001.tar" in err and ("truncated" in err or "cut short" in err)
    err = one_line_error(["data", "shard", str(shards.parent / "images"), str(shards), "--workers", "1"], capsys)
    assert "already holds train shards" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_shard_index_finds_the_members_tarfile_finds(tmp_path, fmt):
    """The header reader that indexes shards (faster than tarfile) on long, non-ASCII and prefixed names."""
    import io
    from arvision.data.shards import _tar_files
    names = ["a/b.jpg", "dir/" + "m" * 90 + "/x.cls", "k" * 150 + "/" + "\u00e9" * 60 + ".png"]
    with tarfile.open(tmp_path / "t.tar", "w", format=fmt) as tar:
        for i, name in enumerate(names[:2] if fmt == tarfile.USTAR_FORMAT else names):
            info = tarfile.TarInfo(name)
            info.size = 700 * i + 1
            tar.addfile(info, io.BytesIO(b"x" * info.size))
    with tarfile.open(tmp_path / "t.tar") as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    with open(tmp_path / "t.tar", "rb") as f:
        assert list(_tar_files(f)) == expected and len(expected) >= 2
