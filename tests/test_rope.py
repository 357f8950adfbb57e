"""2D RoPE (arvision/models/rope.py): the official tables and rotation, relative positions, train-time augmentation,
other grids, and the fused rotation the package runs."""
import math

import torch

from arvision.models.rope import Rope2D, apply_rope_signed, patch_coordinates, signed_sin
from official_reference import apply_rope


def test_rope_tables_match_hand_computed_values():
    d, G, theta = 8, 2, 100.0
    rope = Rope2D(d, G, theta).eval()
    cos, sin = rope()
    assert cos.shape == (1 + G * G, d)
    assert torch.equal(cos[0], torch.ones(d)) and torch.equal(sin[0], torch.zeros(d))  # CLS is not rotated
    freqs = [theta ** (-4 * k / d) for k in range(d // 4)]  # 1.0, 0.1
    for r in range(G):
        for c in range(G):
            y, x = 2 * (r + 0.5) / G - 1, 2 * (c + 0.5) / G - 1
            ay = [2 * math.pi * y * f for f in freqs]
            ax = [2 * math.pi * x * f for f in freqs]
            angles = torch.tensor(ay + ax + ay + ax)
            t = 1 + r * G + c
            torch.testing.assert_close(cos[t], angles.cos(), atol=1e-6, rtol=0)
            torch.testing.assert_close(sin[t], angles.sin(), atol=1e-6, rtol=0)


def test_rope_coordinates_and_rotate_half_pairing():
    coords = patch_coordinates(16)
    assert coords[0].tolist() == [-0.9375, -0.9375] and coords[1].tolist() == [-0.9375, -0.8125]
    d = 64
    rope = Rope2D(d, 16).eval()
    cos, sin = rope()
    e0 = torch.zeros(1 + 256, d)
    e0[:, 0] = 1
    out = apply_rope(e0, cos, sin)
    y = coords[:, 0]
    # spec: a unit vector e0 at patch (y, x) becomes (cos 2πy, sin 2πy) on dims 0 and 32
    torch.testing.assert_close(out[1:, 0], torch.cos(2 * math.pi * y), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1:, 32], torch.sin(2 * math.pi * y), atol=1e-6, rtol=0)
    assert torch.equal(out[0], e0[0])


def test_rope_is_relative_between_patches():
    rope = Rope2D(16, 4).eval()
    cos, sin = rope()
    q, k = torch.randn(16), torch.randn(16)
    qs = apply_rope(q.expand(17, 16), cos, sin)
    ks = apply_rope(k.expand(17, 16), cos, sin)
    # (0,0)->(1,1) and (2,2)->(3,3) have the same offset, hence the same logit
    torch.testing.assert_close(qs[1] @ ks[1 + 5], qs[1 + 10] @ ks[1 + 15], atol=1e-5, rtol=1e-5)


def test_rope_train_augmentation_one_draw_per_call_and_off_in_eval():
    rope = Rope2D(16, 4, rescale=2.0)
    rope.train()
    torch.manual_seed(0)
    c1, _ = rope()
    c2, _ = rope()
    assert not torch.equal(c1, c2)
    torch.manual_seed(0)
    c1b, _ = rope()
    assert torch.equal(c1, c1b)
    rope.eval()
    assert torch.equal(rope()[0], rope()[0])
    scale = rope.augmented_coords() / patch_coordinates(4)
    assert torch.equal(scale, torch.ones_like(scale))
    rope.train()
    s = (rope.augmented_coords() / patch_coordinates(4))
    assert torch.allclose(s, s.flatten()[0]) and 0.5 <= s.flatten()[0] <= 2.0  # one scalar for both axes
    assert torch.equal(scale, torch.ones_like(scale))


def test_fused_rope_equals_rotate_half():
    x = torch.randn(2, 3, 65, 16)
    cos, sin = torch.randn(65, 16), torch.randn(65, 16)
    torch.testing.assert_close(apply_rope_signed(x, cos, signed_sin(sin)), apply_rope(x, cos, sin),
                               atol=1e-6, rtol=1e-6)


def test_rope_for_other_grids():
    rope = Rope2D(16, 4).eval()
    cos, _ = rope()
    torch.testing.assert_close(rope(grid=(4, 4))[0], cos)
    c2, s2 = rope(grid=(3, 5))
    assert c2.shape == (1 + 15, 16)
    coords = patch_coordinates(6, 10)
    assert coords.shape == (60, 2) and coords.abs().max() < 1 and coords[:, 1].unique().numel() == 10
    assert rope(grid=(4, 4)) is rope(grid=(4, 4))  # eval tables are cached
