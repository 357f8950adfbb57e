import json

import numpy as np
import pytest
import torch
from PIL import Image

import arvision
from arvision.eval.visualize import (
    display_map, embedding_similarity_map, load_images, parse_queries, query_attention_map, visualize,
)
from arvision.models.transformer import parse_blocks

G = 8  # nepa_tiny_patch4_32: 32 / 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = arvision.create_model("nepa_tiny_patch4_32", depth=3, layerscale=None)  # no LayerScale: non-trivial blocks
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_parse_blocks():
    assert parse_blocks("all", 3) == [0, 1, 2]
    assert parse_blocks("last", 3) == [2]
    assert parse_blocks(-1, 3) == [2]
    assert parse_blocks(2, 3) == [2]  # one grammar everywhere: an int is one block
    assert parse_blocks("-2:", 3) == [1, 2]
    assert parse_blocks("middle", 4) == [2]
    assert parse_blocks("0,2", 3) == [0, 2]
    assert parse_blocks("0, -1,2", 3) == [0, 2]
    assert parse_blocks([0, -3], 3) == [0]
    for bad in ("0,5", [3], -4, 4, "foo", "1:1"):
        with pytest.raises(ValueError, match="3 blocks|cannot read"):
            parse_blocks(bad, 3)
    with pytest.raises(ValueError, match="block 5 is out of range for a model with 3 blocks"):
        parse_blocks("0,5", 3)


def test_parse_queries():
    assert parse_queries("center", G) == [(4, 4)]
    assert parse_queries((1, 2), G) == [(1, 2)]
    assert parse_queries([1, 2], G) == [(1, 2)]
    assert parse_queries(["3,4", (0, 7), "center"], G) == [(3, 4), (0, 7), (4, 4)]
    r1, r2 = parse_queries(["random", "random"], G, seed=3)
    assert r1 == parse_queries("random", G, seed=3)[0] and all(0 <= v < G for v in r1 + r2)
    for bad in ("8,0", "1", "a,b", (0, -1)):
        with pytest.raises(ValueError):
            parse_queries(bad, G)


def _cls_mass(model, images, query, layers, causal):
    maps = model.attention_maps(images, parse_blocks(layers, 3), causal)
    attn = torch.stack(list(maps.values())).mean(0).mean(1)  # (B, T, T)
    return attn[:, 1 + G * query[0] + query[1], 0]


@pytest.mark.parametrize("layers", ["all", -1, "0,2"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_map_mass(model, images, layers, causal):
    q = (3, 5)
    att = query_attention_map(model, images, q, layers=layers, causal=causal)
    assert att.shape == (2, G, G)
    total = att.sum(dim=(1, 2)) + _cls_mass(model, images, q, layers, causal)
    torch.testing.assert_close(total, torch.ones(2), atol=1e-5, rtol=0)


def test_attention_map_causal_mask(model, images):
    q = (3, 5)
    t = G * q[0] + q[1]
    causal = query_attention_map(model, images, q, causal=True).flatten(1)
    assert torch.all(causal[:, t + 1:] == 0) and torch.all(causal[:, :t + 1] > 0)
    bidir = query_attention_map(model, images, q, causal=False).flatten(1)
    assert torch.all(bidir[:, t + 1:] > 0)
    mx = query_attention_map(model, images, q, head_reduce="max", causal=False)
    assert torch.all(mx >= query_attention_map(model, images, q, head_reduce="mean", causal=False) - 1e-7)
    with pytest.raises(ValueError, match="head_reduce"):
        query_attention_map(model, images, q, head_reduce="none")


def test_attention_map_restores_train_mode(model, images):
    model.train()
    try:
        a = query_attention_map(model, images, (2, 2), causal=True)
        assert model.training  # restored; and the map used eval mode (no RoPE rescale): deterministic
        torch.testing.assert_close(a, query_attention_map(model, images, (2, 2), causal=True))
    finally:
        model.eval()


def test_similarity_map_matches_reference(model, images):
    q = (2, 6)
    sim = embedding_similarity_map(model, images, q, causal=True)
    assert sim.shape == (2, G, G)
    torch.testing.assert_close(sim.sum(dim=(1, 2)), torch.ones(2))
    with torch.no_grad():
        h = model.forward_features(images, causal=True)[:, 1 + G * q[0] + q[1]]
        e = model.embed(images)[:, 1:]
    cos = torch.stack([torch.stack([torch.dot(h[b], e[b, n]) / (h[b].norm() * e[b, n].norm()) for n in range(G * G)])
                       for b in range(2)])
    torch.testing.assert_close(sim.flatten(1), cos.softmax(-1))
    sharp = embedding_similarity_map(model, images, q, temperature=0.05, causal=True)
    torch.testing.assert_close(sharp.flatten(1), (cos / 0.05).softmax(-1))


def test_similarity_top_p(model, images):
    full = embedding_similarity_map(model, images, (1, 1), temperature=0.05).flatten(1)
    cut = embedding_similarity_map(model, images, (1, 1), temperature=0.05, top_p=0.5).flatten(1)
    torch.testing.assert_close(cut.sum(1), torch.ones(2))
    for b in range(2):
        kept = cut[b] > 0
        assert 0 < kept.sum() < G * G
        # the kept patches are the most probable ones, their mass reaches p, and they keep their relative weights
        assert full[b][kept].min() >= full[b][~kept].max()
        assert full[b][kept].sum() >= 0.5
        assert full[b][kept].sum() - full[b][kept].min() < 0.5
        torch.testing.assert_close(cut[b][kept], full[b][kept] / full[b][kept].sum())
    with pytest.raises(ValueError):
        embedding_similarity_map(model, images, (1, 1), top_p=0.0)


def test_display_map():
    m = np.array([[0.0, 0.1], [0.3, 0.5]])
    out = display_map(m, 1.0)
    assert out[0, 0] == 0 and out[1, 1] == pytest.approx(1.0)
    assert 0 < out[0, 1] < out[1, 0] < out[1, 1]
    assert display_map(m, 10.0)[1, 0] < out[1, 0]


def test_visualize_writes_grids(model, images, tmp_path):
    paths = visualize(model, images, ["center", "0,7"], tmp_path / "vis", layers="0,2", names=["a", "b"])
    assert [p.name for p in paths] == ["a_grid.png", "b_grid.png"]
    sizes = []
    for p in paths:
        with Image.open(p) as im:
            im.load()
            sizes.append(im.size)
            assert im.size[0] > 300 and im.size[1] > 300
    one = visualize(model, images[:1], "random", tmp_path / "one")
    with Image.open(one[0]) as im:
        assert im.size[0] == sizes[0][0] and im.size[1] < sizes[0][1]  # two query rows are taller than one
    meta = json.loads((tmp_path / "vis" / "visualize.json").read_text())
    assert meta["queries"] == [[4, 4], [0, 7]] and meta["layers"] == [0, 2] and meta["images"] == ["a", "b"]
    with pytest.raises(ValueError, match="3 blocks"):
        visualize(model, images, "center", tmp_path / "bad", layers="0,5")


def test_load_images(tmp_path):
    arr = np.zeros((20, 10, 3), dtype=np.uint8)
    arr[..., 0] = 255
    Image.fromarray(arr).save(tmp_path / "red.png")
    x = load_images([tmp_path / "red.png"], 32)
    assert x.shape == (1, 3, 32, 32)
    torch.testing.assert_close(x[0, 0], torch.ones(32, 32))
    torch.testing.assert_close(x[0, 1], -torch.ones(32, 32))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_images([tmp_path / "missing.png"], 32)
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(ValueError, match="junk.png"):
        load_images([tmp_path / "junk.png"], 32)
