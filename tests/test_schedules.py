"""Learning-rate schedules (arvision/train/optim.py ``lr_at``): linear warmup, then cosine (official NEPA),
constant (MAR) or poly (mmseg)."""
import pytest

from arvision.train.optim import lr_at


def test_lr_schedule_warmup_and_cosine():
    g = dict(lr_base=1.0, lr_scale=1.0, warmup_steps=10)
    assert lr_at(0, g, 100) == 0.0 and lr_at(5, g, 100) == 0.5 and lr_at(10, g, 100) == 1.0
    assert lr_at(55, g, 100) == pytest.approx(0.5) and lr_at(100, g, 100) == 0.0


def test_schedules_after_warmup():
    g = dict(lr_scale=0.5, warmup_steps=10, lr_base=2.0)
    assert lr_at(5, g, 110) == 0.5  # warmup: 2.0 * 0.5 * 5 / 10, whatever the schedule
    assert lr_at(60, g, 110, schedule="constant") == 1.0 and lr_at(200, g, 110, schedule="constant") == 1.0
    assert lr_at(60, g, 110, schedule="cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="train.schedule"):
        lr_at(60, g, 110, schedule="step")
    # poly as mmcv: (1 - t/T)^p over the whole run, times t/w during the warmup
    g = dict(lr_scale=0.5, warmup_steps=10, lr_base=1e-4)
    assert lr_at(0, g, 100, schedule="poly") == 0.0
    assert lr_at(5, g, 100, schedule="poly") == pytest.approx(5e-5 * 0.95 * 0.5)
    assert lr_at(10, g, 100, schedule="poly") == pytest.approx(5e-5 * 0.9)
    assert lr_at(60, g, 100, schedule="poly", power=2.0) == pytest.approx(5e-5 * 0.4 ** 2)
    assert lr_at(60, g, 100, min_lr=1e-5, schedule="poly") == pytest.approx((1e-4 - 1e-5) * 0.5 * 0.4 + 0.5e-5)
    assert lr_at(100, g, 100, schedule="poly") == 0.0
