import pytest
import torch
import torch.nn.functional as F

import arvision
from arvision.objectives import NepaLossConfig, NepaObjective, nepa_loss
from arvision.objectives.nepa import random_input_mask


@pytest.fixture
def model():
    torch.manual_seed(0)
    return arvision.create_model("nepa_tiny_patch4_32", depth=2, layerscale=None, rope_rescale=None)


def test_official_loss_by_hand(model):
    x = torch.randn(3, 3, 32, 32)
    z = model.embed(x)
    h = model.forward_features(x)
    expected = -F.cosine_similarity(h[:, :-1], z[:, 1:], dim=-1, eps=1e-12).mean()
    torch.testing.assert_close(nepa_loss(model, x), expected, atol=1e-6, rtol=1e-6)
    assert -1 <= nepa_loss(model, x).item() <= 1


def test_stop_gradient_only_changes_the_target_path(model):
    x = torch.randn(2, 3, 32, 32)
    grads = {}
    for sg in (True, False):
        model.zero_grad()
        nepa_loss(model, x, NepaLossConfig(stop_grad=sg)).backward()
        grads[sg] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # blocks only see the input path: identical; the embedding also gets the target path without stop-grad
    torch.testing.assert_close(grads[True]["blocks.1.mlp.fc2.weight"], grads[False]["blocks.1.mlp.fc2.weight"])
    assert not torch.allclose(grads[True]["patch_embed.weight"], grads[False]["patch_embed.weight"])
    # with stop-grad, the conv gradient equals the gradient through the input path alone
    model.zero_grad()
    z = model.embed(x)
    target = model.embed(x).detach()
    loss = -F.cosine_similarity(model.forward_tokens(z)[:, :-1], target[:, 1:], dim=-1).mean()
    loss.backward()
    torch.testing.assert_close(model.patch_embed.weight.grad, grads[True]["patch_embed.weight"])


def test_ablation_switches(model):
    x = torch.randn(2, 3, 32, 32)
    z, h = model.embed(x), model.forward_features(x)
    no_shift = nepa_loss(model, x, NepaLossConfig(shift=False))
    torch.testing.assert_close(no_shift, -F.cosine_similarity(h[:, 1:], z[:, 1:], dim=-1).mean())
    bidir = nepa_loss(model, x, NepaLossConfig(causal=False))
    hb = model.forward_features(x, causal=False)
    torch.testing.assert_close(bidir, -F.cosine_similarity(hb[:, :-1], z[:, 1:], dim=-1).mean())
    mse = nepa_loss(model, x, NepaLossConfig(distance="mse"))
    # |a - b|^2 of unit vectors = 2 - 2 cos
    torch.testing.assert_close(mse, 2 + 2 * nepa_loss(model, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="distance"):
        NepaLossConfig(distance="l1")


def test_random_input_masking(model):
    mask = random_input_mask(4, 64, 0.4, "cpu")
    assert mask.sum(1).tolist() == [26] * 4 and not torch.equal(mask[0], mask[1])
    with pytest.raises(ValueError, match="use_mask_token"):
        nepa_loss(model, torch.randn(1, 3, 32, 32), NepaLossConfig(mask_ratio=0.4))
    m = arvision.create_model("nepa_tiny_patch4_32", depth=2, use_mask_token=True, rope_rescale=None)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    masked = nepa_loss(m, x, NepaLossConfig(mask_ratio=0.5))
    assert not torch.allclose(masked, nepa_loss(m, x))
    masked.backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0


def test_ema_target_network(model):
    obj = NepaObjective(model, NepaLossConfig(target="ema", target_ema_decay=0.5))
    x = torch.randn(2, 3, 32, 32)
    loss, metrics = obj(x)
    torch.testing.assert_close(loss, nepa_loss(model, x))  # the copy starts equal to the model
    assert metrics["pred_std"] > 0
    before = obj.target_model.patch_embed.weight.clone()
    with torch.no_grad():
        model.patch_embed.weight.add_(1.0)
    obj.after_step()
    torch.testing.assert_close(obj.target_model.patch_embed.weight, before + 0.5)
    assert all(not p.requires_grad for p in obj.target_model.parameters())


def test_ema_target_tracks_a_reference_ema_of_the_embedding(model):
    d = 0.8
    obj = NepaObjective(model, NepaLossConfig(target="ema", target_ema_decay=d))
    tracked = ("patch_embed.weight", "patch_embed.bias", "cls_token")  # all that model.embed reads
    assert sorted(n for n, _ in obj.target_model.named_parameters()) == sorted(tracked)
    ref = {n: model.state_dict()[n].clone() for n in tracked}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        obj(x)[0].backward()
        opt.step()
        opt.zero_grad()
        obj.after_step()
        for n in tracked:
            ref[n] = d * ref[n] + (1 - d) * model.state_dict()[n]
    for n in tracked:
        assert not torch.equal(ref[n], model.state_dict()[n]), n  # the target lags the trained model
        torch.testing.assert_close(obj.target_model.state_dict()[n], ref[n], rtol=0, atol=1e-6)
    twin = arvision.create_model("nepa_tiny_patch4_32", depth=2, layerscale=None, rope_rescale=None)
    twin.load_state_dict({**model.state_dict(), **ref})
    torch.testing.assert_close(obj.target_model(x), twin.embed(x))
