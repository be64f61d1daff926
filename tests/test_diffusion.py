import torch
from torch import nn

from ddpm_core.diffusion import eps_loss, min_snr_weights, predicted_x0, q_sample
from ddpm_core.schedule import make_schedule


def test_forward_process_has_closed_form_mean_and_variance():
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    for t in (0, 100, 500, 999):
        index = torch.full((n,), t)
        xt = q_sample(schedule, x0, index, torch.randn(n, 1, generator=g))
        ab = schedule.alpha_bars[t].item()
        assert abs(xt.mean().item() - ab**0.5 * 0.7) < 0.01
        assert abs(xt.var().item() - (1 - ab)) < 0.01


def test_each_sample_gets_its_own_timestep():
    schedule = make_schedule("linear", 1000)
    x0 = torch.ones(2, 1, 2, 2)
    noise = torch.zeros_like(x0)
    xt = q_sample(schedule, x0, torch.tensor([0, 999]), noise)
    assert torch.allclose(xt[0], torch.full((1, 2, 2), schedule.alpha_bars[0].sqrt().item()))
    assert torch.allclose(xt[1], torch.full((1, 2, 2), schedule.alpha_bars[999].sqrt().item()))


def test_predicted_x0_inverts_q_sample():
    schedule = make_schedule("cosine", 1000)
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    index = torch.randint(0, 1000, (8,))
    xt = q_sample(schedule, x0, index, noise)
    assert torch.allclose(predicted_x0(schedule, xt, index, noise), x0, atol=1e-3)


class OracleEps(nn.Module):
    """The exact ε for data that is always the constant `c`: (x_t − √ᾱ c) / √(1 − ᾱ)."""

    def __init__(self, schedule, c):
        super().__init__()
        self.ab = schedule.alpha_bars.float()
        self.c = c

    def forward(self, xt, t, labels=None):
        ab = self.ab[t].view(-1, 1, 1, 1)
        return (xt - ab.sqrt() * self.c) / (1 - ab).sqrt()


def test_eps_loss_is_zero_for_the_exact_noise_predictor():
    schedule = make_schedule("linear", 1000)
    x0 = torch.full((64, 1, 4, 4), 0.3)
    loss = eps_loss(OracleEps(schedule, 0.3), schedule, x0, None, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-6


def test_eps_loss_of_a_zero_predictor_is_the_noise_variance():
    schedule = make_schedule("linear", 1000)
    zero = lambda xt, t, labels: torch.zeros_like(xt)  # noqa: E731
    loss = eps_loss(zero, schedule, torch.zeros(256, 1, 8, 8), None, torch.Generator().manual_seed(0))
    assert abs(loss.item() - 1.0) < 0.02


def test_min_snr_weights_cap_the_signal_to_noise_ratio():
    schedule = make_schedule("linear", 1000)
    weights = min_snr_weights(schedule, torch.arange(1000), gamma=5.0)
    # t = 1: ᾱ = 1 − 1e-4, SNR = 9999, so w = 5 / 9999.
    assert abs(weights[0].item() - 5 / 9999) < 1e-7
    # w = 1 exactly where SNR ≤ γ, i.e. ᾱ ≤ γ / (1 + γ) = 5/6; below 1 everywhere else.
    noisy = schedule.alpha_bars <= 5 / 6
    assert torch.all(weights[noisy] == 1) and torch.all(weights[~noisy] < 1)
    assert 0 < noisy.int().argmax() < 1000


def test_min_snr_loss_of_a_zero_predictor_is_the_mean_weight():
    # ‖ε − 0‖² has mean 1 at every t, so the weighted loss is E_t[w_t] over uniform t.
    schedule = make_schedule("cosine", 1000)
    zero = lambda xt, t, labels: torch.zeros_like(xt)  # noqa: E731
    loss = eps_loss(zero, schedule, torch.zeros(4096, 1, 8, 8), None, torch.Generator().manual_seed(0), min_snr_gamma=5.0)
    expected = min_snr_weights(schedule, torch.arange(1000), gamma=5.0).mean().item()
    assert abs(loss.item() - expected) < 0.02
