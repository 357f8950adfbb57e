"""`arvision demo`: the plain functions behind the page (a sampled grid, the class names, the NEPA maps) and, where
Gradio is installed, the page itself with its callbacks. Tiny models only."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import arvision
from arvision.cli import demo as demo_cli
from arvision.cli import build_parser, main

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMG = 32  # the vq_token_cache fixture's images: 8 x 8 codes of a /4 tokenizer


@pytest.fixture(scope="module")
def quickstart_run(vq_token_cache, tmp_path_factory):
    """A generation quick start run's layout: RUN/config.yaml with data.source empty, RUN/cache (a copy of the
    fixture's cache, its classes renamed) and a tiny generator checkpoint under RUN/checkpoints."""
    run = tmp_path_factory.mktemp("qs_run")
    (run / "config.yaml").write_text("data:\n  source: null\n")
    shutil.copytree(vq_token_cache, run / "cache")
    header = json.loads((run / "cache" / "header.json").read_text())
    assert header["num_classes"] == len(NAMES)
    header["classes"] = NAMES
    (run / "cache" / "header.json").write_text(json.dumps(header))
    torch.manual_seed(0)
    model = arvision.create_model("heptapod_tiny", grid_size=8, codebook_size=header["codebook_size"],
                                  num_classes=len(NAMES), embed_dim=32, depth=1, num_heads=2, head_depth=1)
    return arvision.save_model(model.eval(), run / "checkpoints" / "step_00000010")


@pytest.fixture(scope="module")
def generator(quickstart_run):
    return demo_cli.load_generator(quickstart_run)


@pytest.fixture(scope="module")
def nepa_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = arvision.create_model("nepa_tiny_patch4_32", depth=2)
    return arvision.save_model(model.eval(), tmp_path_factory.mktemp("nepa") / "nepa")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def test_class_names_and_tokenizer_come_from_the_quickstart_runs_cache(generator):
    assert generator.class_names == NAMES
    assert demo_cli.class_choices(generator)[:2] == [("0: zero", 0), ("1: one", 1)]
    assert generator.tokenizer.codebook_size == generator.model.config.codebook_size


def row_label_width(grid, num_per_class):
    """The width of the class-name column on the left of a grid."""
    return grid.shape[1] - num_per_class * (IMG + 2)


def test_sample_grid_has_one_named_row_per_chosen_class_and_is_fixed_by_the_seed(generator, tmp_path):
    grid = demo_cli.sample_grid(generator, [7, 2], num_per_class=3, temperature=1.0, top_k=0, seed=5)
    assert grid.dtype == np.uint8 and grid.shape[0] == 2 * (IMG + 2) and grid.shape[2] == 3
    names_column = grid[:, :row_label_width(grid, 3)]
    assert names_column.shape[1] > 0 and (names_column < 128).any()  # the names "two", "seven" in black
    again = demo_cli.sample_grid(generator, [2, 7], num_per_class=3, temperature=1.0, top_k=0, seed=5)
    np.testing.assert_array_equal(grid, again)
    other = demo_cli.sample_grid(generator, [7, 2], num_per_class=3, temperature=1.0, top_k=0, seed=6)
    assert not np.array_equal(grid, other)
    path = demo_cli.grid_file(grid, tmp_path, [7, 2], 3, 1.0, 0, 5)
    assert path.name == "samples_c2-7_n3_t1_k0_seed5.png"
    assert demo_cli.grid_file(grid, tmp_path, [7, 2], 3, 0.9, 0, 5) != path  # other settings, another file
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)


def test_sample_grid_rows_are_the_generators_samples_in_class_order(generator):
    from arvision.generate.outputs import class_labels, generate_images
    from arvision.generate.sample import SamplingConfig

    grid = demo_cli.sample_grid(generator, [4, 1], num_per_class=2, temperature=0.8, top_k=10, seed=3)
    labels = class_labels([1, 4], 2, 3)
    images = generate_images(generator.model, generator.tokenizer, labels, SamplingConfig(temperature=0.8, top_k=10),
                             seed=3, progress=False)
    first_of_class_4 = images[labels == 4][0].numpy()
    left = row_label_width(grid, 2)
    np.testing.assert_array_equal(grid[IMG + 2:2 * IMG + 2, left:left + IMG], first_of_class_4)


@pytest.mark.parametrize("kwargs, message", [(dict(classes=[]), "choose at least one class"),
                                             (dict(classes=[10]), "classes must be in 0..9"),
                                             (dict(classes=[1], num_per_class=0), "at least 1"),
                                             (dict(classes=[1], top_k=-1), "top-k")])
def test_sample_grid_refuses_bad_settings_in_one_line(generator, kwargs, message):
    with pytest.raises(ValueError, match=message):
        demo_cli.sample_grid(generator, **kwargs)


def test_nepa_maps_are_the_visualize_maps_on_the_patch_grid(nepa_checkpoint, image_file, tmp_path):
    from arvision.eval.visualize import embedding_similarity_map, load_images, query_attention_map

    model = arvision.load_model(nepa_checkpoint, family="nepa_vit")
    maps = demo_cli.nepa_maps(model, image_file, tmp_path, query=(2, 5))
    G = model.grid_size
    assert maps.query == (2, 5) and maps.attention.shape == (G, G) and maps.similarity.shape == (G, G)
    assert maps.similarity.sum() == pytest.approx(1.0, abs=1e-5)
    images = load_images([image_file], model.config.img_size)
    np.testing.assert_allclose(maps.attention, query_attention_map(model, images, (2, 5))[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(maps.similarity, embedding_similarity_map(model, images, (2, 5))[0].numpy(),
                               atol=1e-6)
    assert Image.open(maps.figure).size[0] > 0
    with pytest.raises(ValueError, match="outside the"):
        demo_cli.nepa_maps(model, image_file, tmp_path, query=(G, 0))


def test_sample_finds_the_quickstart_runs_cache_and_its_class_names(quickstart_run, tmp_path, capsys):
    main(["sample", str(quickstart_run), "--out", str(tmp_path / "s"), "--classes", "three,zero",
          "--num-per-class", "1", "--batch-size", "2"])
    labels = np.load(tmp_path / "s" / "samples.npz")["arr_1"]
    assert sorted(labels.tolist()) == [0, 3]


def test_share_takes_true_or_false():
    parse = build_parser().parse_args
    assert parse(["demo", "ckpt"]).share is False
    assert parse(["demo", "ckpt", "--share"]).share is True
    assert parse(["demo", "ckpt", "--share", "false", "--port", "7000"]).share is False


def test_without_gradio_the_command_says_how_to_install_it(quickstart_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", str(quickstart_run)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "arvision: error: the demo needs Gradio: pip install 'arvision[demo]'"


def _callback(blocks, name):
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    return next(f.fn for f in fns if getattr(f.fn, "__name__", "") == name)


def test_generator_page_builds_and_its_sample_button_writes_the_grid(quickstart_run, tmp_path):
    gr = pytest.importorskip("gradio")
    page = demo_cli.build_demo(quickstart_run, workdir=tmp_path)
    assert isinstance(page, gr.Blocks)
    on_sample = _callback(page, "on_sample")
    grid, png = on_sample([3, 0], 2, 1.0, 0, 1)
    np.testing.assert_array_equal(grid, demo_cli.sample_grid(demo_cli.load_generator(quickstart_run), [0, 3], 2,
                                                              seed=1))
    np.testing.assert_array_equal(np.asarray(Image.open(png)), grid)
    with pytest.raises(gr.Error, match="choose at least one class"):
        on_sample([], 2, 1.0, 0, 1)


def test_nepa_page_builds_and_shows_the_maps(nepa_checkpoint, image_file, tmp_path):
    gr = pytest.importorskip("gradio")
    page = demo_cli.build_demo(nepa_checkpoint, workdir=tmp_path)
    assert isinstance(page, gr.Blocks)
    figure = _callback(page, "on_maps")(str(image_file), 1, 2, "last", "mean")
    assert Image.open(figure).size[0] > 0
    with pytest.raises(gr.Error, match="upload an image first"):
        _callback(page, "on_maps")(None, 1, 2, "all", "mean")


def test_a_tokenizer_checkpoint_is_refused_in_one_line(vq_token_cache, capsys):
    pytest.importorskip("gradio")
    with pytest.raises(SystemExit):
        main(["demo", str(vq_token_cache / "tokenizer")])
    assert capsys.readouterr().err.strip() == ("arvision: error: arvision demo serves a Heptapod generator or a NEPA "
                                               "backbone; this checkpoint holds a vq_tokenizer model")
