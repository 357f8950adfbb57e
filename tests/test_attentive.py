"""Attentive probe: it reads a token that mean pooling cancels out, chooses its lr without the test set, runs on a
model's frozen tokens, and `arvision eval attentive` works end to end."""
import json

import pytest
import torch

from arvision.eval import FeatureSpec, attentive_probe, extract_features, extract_tokens, linear_probe
from arvision.models import create_model


def _cancelling_tokens(n: int, seed: int, T: int = 12, D: int = 16, C: int = 4):
    """Class vector c_y at one random token (marker +4) and -c_y at another (marker -4): the mean of the tokens
    carries nothing about y; a query that attends to the +4 marker reads it."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randn(C, D - 1, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.randint(0, C, (n,), generator=g)
    x = torch.randn(n, T, D, generator=g) * 0.3
    pos = torch.stack([torch.randperm(T, generator=g)[:2] for _ in range(n)])
    rows = torch.arange(n)
    x[rows, pos[:, 0], :-1] += classes[y]
    x[rows, pos[:, 0], -1] = 4.0
    x[rows, pos[:, 1], :-1] -= classes[y]
    x[rows, pos[:, 1], -1] = -4.0
    x -= x.mean(dim=1, keepdim=True) - x.mean(dim=(0, 1))  # exact: equal mean token for every sample
    return x, y


def test_attentive_probe_reads_what_mean_pooling_cancels():
    xtr, ytr = _cancelling_tokens(600, 0)
    xte, yte = _cancelling_tokens(300, 1)
    att = attentive_probe(xtr, ytr, xte, yte, epochs=15, lr=[1e-3, 1e-2], num_heads=2)
    lin = linear_probe(xtr.mean(1), ytr, xte.mean(1), yte, epochs=15)
    assert att["top1"] > 90 and lin["top1"] < 40, (att["top1"], lin["top1"])
    assert set(att["sweep"]) == {1e-3, 1e-2} and att["best_lr"] in att["sweep"]
    again = attentive_probe(xtr, ytr, xte, yte, epochs=15, lr=[1e-3, 1e-2], num_heads=2)
    assert again["top1"] == att["top1"]  # deterministic given the seed


def test_attentive_probe_errors():
    x, y = _cancelling_tokens(20, 0)
    with pytest.raises(ValueError, match=r"token features \(N, T, D\)"):
        attentive_probe(x.mean(1), y, x.mean(1), y)
    with pytest.raises(ValueError, match="not divisible"):
        attentive_probe(x, y, x, y, num_heads=3, lr=1e-3)


def test_extract_tokens_matches_pooled_features():
    model = create_model("nepa_tiny_patch4_32", depth=2).eval()
    data = [(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))]
    spec = FeatureSpec.parse("0,1", depth=2)
    tokens, labels = extract_tokens(model, data, spec)
    assert tokens.shape == (3, 64, 192) and tokens.dtype == torch.bfloat16 and labels.tolist() == [0, 1, 2]
    pooled, _ = extract_features(model, data, spec)
    torch.testing.assert_close(tokens.float().mean(1), pooled, atol=2e-2, rtol=2e-2)  # bf16 storage


def test_cli_eval_attentive(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    import arvision
    from arvision.cli import main

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            (root / split / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    arvision.save_model(create_model("nepa_tiny_patch4_32", depth=2), tmp_path / "ckpt")
    out = tmp_path / "att.json"
    main(["eval", "attentive", str(tmp_path / "ckpt"), "--data", str(root), "--blocks", "middle", "--epochs", "2",
          "--num-workers", "0", "--heads", "2", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["n_train"] == 12 and res["n_test"] == 12 and 0 <= res["top1"] <= 100 and res["num_heads"] == 2
    assert "attentive: top-1" in capsys.readouterr().out
