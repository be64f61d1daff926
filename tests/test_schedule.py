import math

import pytest
import torch

from ddpm_core.schedule import NoiseSchedule, cosine_alpha_bar, cosine_betas, linear_betas, make_schedule


def test_linear_betas_match_the_ddpm_paper():
    betas = linear_betas(1000)
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_alpha_bar_is_the_product_of_one_minus_beta():
    schedule = make_schedule("linear", 1000)
    for t in (0, 1, 10, 499, 999):
        expected = math.prod(1 - b for b in schedule.betas[: t + 1].tolist())
        assert schedule.alpha_bars[t].item() == pytest.approx(expected, rel=1e-12)
    # The well-known endpoint of the DDPM schedule: almost all signal is gone at t = T.
    assert schedule.alpha_bars[-1].item() == pytest.approx(4.04e-5, rel=0.01)


def test_alpha_bar_at_minus_one_is_one():
    schedule = make_schedule("linear", 10)
    assert schedule.alpha_bar_at(torch.tensor(-1)).item() == 1.0
    assert schedule.alpha_bar_at(torch.tensor(3)).item() == schedule.alpha_bars[3].item()


def test_cosine_alpha_bar_follows_nichol_dhariwal_formula():
    T, s = 1000, 0.008
    schedule = make_schedule("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    # Index i is timestep t = i + 1; away from the clipped end the product equals f(t)/f(0).
    for i in (0, 10, 500, 900):
        assert schedule.alpha_bars[i].item() == pytest.approx(f(i + 1) / f(0), rel=1e-9)
    assert cosine_alpha_bar(torch.tensor(0.0), T).item() == 1.0


def test_cosine_betas_are_clipped_and_increasing():
    betas = cosine_betas(1000)
    assert betas.max().item() == pytest.approx(0.999)
    assert (betas > 0).all()
    assert (betas.diff() >= 0).all()


def test_linear_schedule_scales_with_fewer_steps():
    short = make_schedule("linear", 100)
    assert short.betas[0].item() == pytest.approx(1e-3)
    assert short.betas[-1].item() == pytest.approx(0.2)
    assert short.alpha_bars[-1].item() < 1e-4


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="sigmoid"):
        make_schedule("sigmoid", 10)


def test_schedule_properties():
    schedule = NoiseSchedule(torch.tensor([0.1, 0.2], dtype=torch.float64))
    assert schedule.timesteps == 2
    assert torch.allclose(schedule.alphas, torch.tensor([0.9, 0.8], dtype=torch.float64))
    assert torch.allclose(schedule.alpha_bars, torch.tensor([0.9, 0.72], dtype=torch.float64))
