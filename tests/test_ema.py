import pytest
import torch
from torch import nn

from ddpm_core.ema import make_ema, warmed_up_decay


def test_decay_warms_up_then_caps():
    assert warmed_up_decay(0.999, 0) == pytest.approx(0.1)
    assert warmed_up_decay(0.999, 10) == pytest.approx(11 / 20)
    assert warmed_up_decay(0.999, 100_000) == 0.999


def test_ema_arithmetic_matches_closed_form():
    model = nn.Linear(1, 1, bias=False)
    decay = 0.5
    ema = make_ema(model, decay)
    values = [2.0, 4.0, 8.0, 16.0]
    expected = None
    for n, v in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update_parameters(model)
        if n == 0:
            expected = v  # the first update copies
        else:
            d = min(decay, (1 + n) / (10 + n))
            expected = d * expected + (1 - d) * v
        assert ema.module.weight.item() == pytest.approx(expected)
    # With decay 0.5 reached from n = 9 on; here d = 2/11, 3/12, 4/13 (all below 0.5).
    manual = 2.0
    for n, v in ((1, 4.0), (2, 8.0), (3, 16.0)):
        d = (1 + n) / (10 + n)
        manual = d * manual + (1 - d) * v
    assert ema.module.weight.item() == pytest.approx(manual)


def test_ema_does_not_track_gradients_and_keeps_its_own_copy():
    model = nn.Linear(2, 2)
    ema = make_ema(model, 0.9)
    assert not any(p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(ema.module.weight, model.weight)
