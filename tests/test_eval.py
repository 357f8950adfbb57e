import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import arvision
from arvision.eval import (FeatureSpec, extract_features, knn_classify, knn_eval, knn_scores, linear_eval,
                           linear_probe, pool_tokens)


def gaussian_clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 10
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centers[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # LayerScale 1e-5 would leave the blocks nearly the identity and blocks/attention modes indistinguishable
    return arvision.create_model("nepa_tiny_patch4_32", depth=2, layerscale=1.0)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 3, 32, 32, generator=g), torch.arange(10) % 3


def loader(images, labels, batch_size=4):
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


# ------------------------------------------------------------------ FeatureSpec
def test_spec_parse():
    assert FeatureSpec.parse("-1").blocks == [-1]
    assert FeatureSpec.parse("3").blocks == [3]
    assert FeatureSpec.parse("2, 3,4").blocks == [2, 3, 4]
    assert FeatureSpec.parse("middle", depth=6).blocks == [3]
    assert FeatureSpec.parse("middle", depth=12).blocks == [6]
    assert FeatureSpec.parse("all", depth=3).blocks == [0, 1, 2]
    assert FeatureSpec.parse([1, -2], pool="cls", norm=True, causal=False) == FeatureSpec([1, -2], "cls", True, False)
    assert FeatureSpec().blocks == [-1] and FeatureSpec().pool == "mean" and FeatureSpec().norm is False
    with pytest.raises(ValueError, match="depth"):
        FeatureSpec.parse("middle")
    with pytest.raises(ValueError, match="out of range"):
        FeatureSpec.parse("6", depth=6)
    assert FeatureSpec.parse("last").blocks == [-1]
    with pytest.raises(ValueError, match="not a block selection"):
        FeatureSpec.parse("final")
    with pytest.raises(ValueError, match="cannot read blocks 'final'"):
        FeatureSpec.parse("final", depth=6)
    # one grammar: an index list with a repeat (3 and -3 of 6 blocks) and a slice, no IndexError
    assert FeatureSpec.parse("3,-3,5", depth=6).blocks == [3, 5]
    assert FeatureSpec.parse("-2:", depth=6).blocks == [4, 5]
    with pytest.raises(ValueError, match="pool"):
        FeatureSpec.parse("-1", pool="max")


# ------------------------------------------------------------- extract_features
def test_extract_single_block_matches_forward_intermediates(model, data):
    images, labels = data
    model.eval()
    with torch.no_grad():
        tokens0, tokens = (torch.cat(pair[::-1], dim=1) for pair in model.forward_intermediates(
            images, indices=[0, 1], return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True))
    for pool, ref in (("mean", tokens[:, 1:].mean(1)), ("cls", tokens[:, 0]), ("last", tokens[:, -1])):
        feats, out_labels = extract_features(model, loader(images, labels), FeatureSpec([1], pool), progress=False)
        assert feats.dtype == torch.float32 and feats.shape == (10, model.embed_dim)
        torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
        assert out_labels.dtype == torch.int64 and torch.equal(out_labels, labels)
    # the mean pool must exclude the CLS token
    assert not torch.allclose(pool_tokens(tokens, "mean"), tokens.mean(1))
    # block 0 differs from block 1, so the block index is honoured
    feats0, _ = extract_features(model, loader(images, labels), FeatureSpec([0]), progress=False)
    torch.testing.assert_close(feats0, tokens0[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(feats0, tokens[:, 1:].mean(1), atol=1e-3)


def test_extract_last_block_norm_equals_forward_features(model, data):
    images, labels = data
    model.eval()
    with torch.no_grad():
        ref = model.forward_features(images)[:, 1:].mean(1)
        ref_bidir = model.forward_features(images, causal=False)[:, 1:].mean(1)
    feats, _ = extract_features(model, loader(images, labels), FeatureSpec([-1], "mean", norm=True), progress=False)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    unnormed, _ = extract_features(model, loader(images, labels), FeatureSpec([-1], "mean", norm=False), progress=False)
    assert not torch.allclose(unnormed, ref, atol=1e-2)
    bidir, _ = extract_features(model, loader(images, labels), FeatureSpec([-1], "mean", True, causal=False),
                                progress=False)
    torch.testing.assert_close(bidir, ref_bidir, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(bidir, ref, atol=1e-3)


def test_extract_averages_blocks(model, data):
    images, labels = data
    model.eval()
    with torch.no_grad():
        (_, c0), (_, c1) = model.forward_intermediates(images, indices=[0, 1], return_prefix_tokens=True, norm=True,
                                                       intermediates_only=True)
    ref = (c0[:, 0] + c1[:, 0]) / 2
    feats, _ = extract_features(model, loader(images, labels), FeatureSpec([0, -1], "cls", norm=True), progress=False)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)


def test_extract_restores_training_mode_and_bf16(model, data):
    images, labels = data
    spec = FeatureSpec([1])
    model.train()
    ref, _ = extract_features(model, loader(images, labels), spec, progress=False)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    bf16, _ = extract_features(model, loader(images, labels), spec, amp_dtype=torch.bfloat16, progress=False)
    assert not model.training
    assert bf16.dtype == torch.float32
    # train mode would randomly rescale RoPE; eval extraction must not, so the two agree up to bf16 rounding
    assert (bf16 - ref).norm() / ref.norm() < 0.05
    again, _ = extract_features(model, loader(images, labels, batch_size=3), spec, progress=False)
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- kNN
def brute_force_votes(train, train_labels, test, k, T, C):
    """DINO's weighted vote, one test sample at a time in plain Python."""
    out = torch.zeros(len(test), C)
    for i in range(len(test)):
        q = test[i] / test[i].norm()
        sims = [(float(q @ (t / t.norm())), int(y)) for t, y in zip(train, train_labels)]
        sims.sort(key=lambda s: -s[0])
        for s, y in sims[:k]:
            out[i, y] += math.exp(s / T)
    return out


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=g), torch.randn(23, 8, generator=g)
    train_labels, test_labels = torch.randint(0, 5, (60,), generator=g), torch.randint(0, 5, (23,), generator=g)
    for k, T in ((1, 0.07), (7, 0.07), (7, 0.5)):
        ref = brute_force_votes(train, train_labels, test, k, T, 5)
        scores = knn_scores(train, train_labels, test, k, T, num_classes=5, chunk=4)
        torch.testing.assert_close(scores, ref, rtol=1e-4, atol=0)
        assert torch.equal(scores.argmax(1), ref.argmax(1))
        acc = knn_classify(train, train_labels, test, test_labels, k, T, num_classes=5, chunk=4)
        assert acc["top1"] == pytest.approx(100 * (ref.argmax(1) == test_labels).float().mean().item())
        top5 = ref.topk(5, dim=1).indices.eq(test_labels[:, None]).any(1).float().mean().item()
        assert acc["top5"] == pytest.approx(100 * top5)


def test_knn_separated_clusters():
    train, train_labels = gaussian_clusters(30, 4, 16, 0.5, seed=0)
    test, test_labels = gaussian_clusters(10, 4, 16, 0.5, seed=0)
    acc = knn_classify(train, train_labels, test + 0.1, test_labels, k=20)
    assert acc == {"top1": 100.0, "top5": 100.0}
    with pytest.raises(ValueError, match="k=500"):
        knn_classify(train, train_labels, test, test_labels, k=500)


def test_knn_k_and_temperature():
    # one class-0 neighbour very close to the query, four class-1 neighbours a bit farther
    train = torch.tensor([[1.0, 0.05], [1.0, 0.3], [1.0, -0.3], [1.0, 0.32], [1.0, -0.32]])
    train_labels = torch.tensor([0, 1, 1, 1, 1])
    query, label0 = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert knn_classify(train, train_labels, query, label0, k=1, num_classes=2)["top1"] == 100.0  # nearest
    assert knn_classify(train, train_labels, query, label0, k=5, temperature=100.0, num_classes=2)["top1"] == 0.0
    assert knn_classify(train, train_labels, query, label0, k=5, temperature=0.001, num_classes=2)["top1"] == 100.0


def test_knn_eval(model, data):
    images, labels = data
    spec = FeatureSpec([0])
    out = knn_eval(model, loader(images, labels), loader(images, labels), spec, k=1, progress=False)
    # every test image is its own nearest neighbour
    assert out["top1"] == 100.0 and out["n_train"] == 10 and out["n_test"] == 10
    assert out["spec"] == spec.to_dict() and out["k"] == 1


# ------------------------------------------------------------- linear probe
def test_linear_probe_separable():
    train, train_labels = gaussian_clusters(50, 4, 32, 2.0, seed=0)
    test, test_labels = gaussian_clusters(50, 4, 32, 2.0, seed=0)
    test = test + 0.1 * torch.randn_like(test)
    out = linear_probe(train, train_labels, test, test_labels, epochs=30, lr=[1e-3, 1e-2])
    assert out["top1"] == 100.0 and out["train_top1"] == 100.0
    assert out["best_lr"] in (1e-3, 1e-2) and set(out["sweep"]) == {1e-3, 1e-2}


def test_linear_probe_random_labels_is_chance():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(500, 32, generator=g), torch.randn(1000, 32, generator=g)
    train_labels, test_labels = torch.randint(0, 10, (500,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    out = linear_probe(train, train_labels, test, test_labels, num_classes=10, epochs=50, lr=1e-2)
    assert out["train_top1"] > 20.0  # it does fit the training noise...
    assert out["top1"] < 16.0  # ...but stays at chance (10%) on held-out data


def test_linear_probe_deterministic_and_never_selects_on_test():
    train, train_labels = gaussian_clusters(40, 3, 8, 8.0, seed=2)
    test, test_labels = gaussian_clusters(20, 3, 8, 8.0, seed=3)
    kw = dict(epochs=10, lr=[1e-4, 1e-3, 3e-2], seed=5)
    a = linear_probe(train, train_labels, test, test_labels, **kw)
    b = linear_probe(train, train_labels, test, test_labels, **kw)
    assert a == b
    shuffled = linear_probe(train, train_labels, test, test_labels[torch.randperm(len(test_labels))], **kw)
    assert shuffled["best_lr"] == a["best_lr"] and shuffled["sweep"] == a["sweep"]
    c = linear_probe(train, train_labels, test, test_labels, **{**kw, "seed": 6})
    assert c["sweep"] != a["sweep"]  # a different seed draws a different held-out split


def test_linear_eval_with_inference_features(model, data):
    images, labels = data
    out = linear_eval(model, loader(images, labels), loader(images, labels), FeatureSpec([0]), epochs=50, lr=1e-2,
                      optimizer="sgd", progress=False)
    assert out["train_top1"] == 100.0 and out["top1"] == 100.0  # 10 points in 192 dims are separable
    assert out["spec"]["blocks"] == [0] and out["n_test"] == 10
