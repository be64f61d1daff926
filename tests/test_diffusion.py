import torch
from torch import nn

from ddpm_core.diffusion import (
    diffusion_loss,
    diffusion_loss_terms,
    draw_noise,
    min_snr_weights,
    predicted_x0,
    q_sample,
    v_target,
    x0_and_eps,
)
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


def test_offset_noise_has_its_closed_form_covariance():
    # ε = z + c·s, z per pixel and s per image and channel, all N(0, 1): Var ε = 1 + c²,
    # Cov(two pixels of one image and channel) = c², and 0 across channels or images.
    c, n = 0.5, 100_000
    noise = draw_noise((n, 2, 3, 3), torch.Generator().manual_seed(0), c)
    flat = noise.flatten(2)
    assert abs(flat.var().item() - (1 + c**2)) < 0.02
    same_channel = (flat[:, 0, 0] * flat[:, 0, 5]).mean().item()
    other_channel = (flat[:, 0, 0] * flat[:, 1, 0]).mean().item()
    other_image = (flat[:-1, 0, 0] * flat[1:, 0, 0]).mean().item()
    assert abs(same_channel - c**2) < 0.02 and abs(other_channel) < 0.02 and abs(other_image) < 0.02
    # Offset 0 draws exactly what torch.randn draws, so runs without it keep their bytes.
    assert torch.equal(
        draw_noise((4, 1, 5, 5), torch.Generator().manual_seed(3), 0.0),
        torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(3)),
    )


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
    loss = diffusion_loss(OracleEps(schedule, 0.3), schedule, x0, None, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-6


def test_eps_loss_of_a_zero_predictor_is_the_noise_variance():
    schedule = make_schedule("linear", 1000)
    zero = lambda xt, t, labels: torch.zeros_like(xt)  # noqa: E731
    loss = diffusion_loss(zero, schedule, torch.zeros(256, 1, 8, 8), None, torch.Generator().manual_seed(0))
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
    loss = diffusion_loss(
        zero, schedule, torch.zeros(4096, 1, 8, 8), None, torch.Generator().manual_seed(0), "eps", min_snr_gamma=5.0
    )
    expected = min_snr_weights(schedule, torch.arange(1000), gamma=5.0).mean().item()
    assert abs(loss.item() - expected) < 0.02


def test_v_prediction_recovers_x0_and_eps_exactly():
    # With the true v = α ε − σ x_0, x̂_0 = α x_t − σ v and ε̂ = σ x_t + α v are exact (α² + σ² = 1).
    schedule = make_schedule("linear", 1000)
    x0 = torch.rand(16, 1, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    index = torch.randint(0, 1000, (16,))
    xt = q_sample(schedule, x0, index, noise)
    v = v_target(schedule, x0, index, noise)
    alpha_bar = schedule.alpha_bars[index].view(-1, 1, 1, 1)
    x0_hat, eps_hat = x0_and_eps(alpha_bar, xt, v, "v")
    assert torch.allclose(x0_hat, x0, atol=1e-10) and torch.allclose(eps_hat, noise, atol=1e-10)
    # ε-prediction with the true noise gives the same pair.
    x0_eps, eps_eps = x0_and_eps(alpha_bar, xt, noise, "eps")
    assert torch.allclose(x0_eps, x0, atol=1e-8) and torch.equal(eps_eps, noise)


def test_v_loss_of_a_zero_predictor_is_the_mean_of_alpha_bar_eps2_plus_sigma2_x02():
    # E‖v‖² = ᾱ E[ε²] + (1 − ᾱ) x_0² per pixel; with x_0 ≡ 0.5 the loss is E_t[ᾱ + 0.25 (1 − ᾱ)].
    schedule = make_schedule("linear", 1000)
    zero = lambda xt, t, labels: torch.zeros_like(xt)  # noqa: E731
    loss = diffusion_loss(zero, schedule, torch.full((4096, 1, 8, 8), 0.5), None, torch.Generator().manual_seed(0), "v")
    ab = schedule.alpha_bars
    assert abs(loss.item() - (ab + 0.25 * (1 - ab)).mean().item()) < 0.02


def test_min_snr_weights_for_v_are_capped_snr_over_snr_plus_one():
    schedule = make_schedule("linear", 1000)
    index = torch.arange(1000)
    snr = schedule.alpha_bars / (1 - schedule.alpha_bars)
    weights = min_snr_weights(schedule, index, gamma=5.0, prediction="v")
    assert torch.allclose(weights.double(), snr.clamp(max=5.0) / (snr + 1), rtol=1e-6)
    # In x̂_0 terms both targets weigh the error by min(SNR, γ): w_v (SNR + 1) = w_ε SNR.
    eps_weights = min_snr_weights(schedule, index, gamma=5.0, prediction="eps")
    assert torch.allclose(weights.double() * (snr + 1), eps_weights.double() * snr, rtol=1e-5)


def test_eps_loss_terms_of_an_eps_model_are_its_unweighted_loss():
    schedule = make_schedule("linear", 1000)
    zero = lambda xt, t, labels: torch.zeros_like(xt)  # noqa: E731
    terms = diffusion_loss_terms(zero, schedule, torch.zeros(64, 1, 8, 8), None, torch.Generator().manual_seed(0))
    assert terms.index.shape == (64,) and terms.eps_mse.shape == (64,)
    assert torch.allclose(terms.eps_mse.mean(), terms.loss)


def test_eps_loss_terms_of_a_v_model_are_zero_for_the_exact_v_and_alpha_bar_squared_for_zero():
    # v̂ = 0 at x_0 = 0: ε̂ = σ x_t = σ² ε, so ‖ε − ε̂‖² = (1 − σ²)² ‖ε‖² = ᾱ² ‖ε‖² per sample.
    schedule = make_schedule("linear", 1000)
    zero = lambda xt, t, labels: torch.zeros_like(xt)  # noqa: E731
    terms = diffusion_loss_terms(
        zero, schedule, torch.zeros(32, 1, 64, 64), None, torch.Generator().manual_seed(0), "v"
    )
    expected = schedule.alpha_bars[terms.index].float() ** 2
    assert torch.allclose(terms.eps_mse, expected, rtol=0.06, atol=1e-4)

    class OracleV(nn.Module):  # knows x_0 = 0.3 everywhere, so v = (x_t − α x_0)/σ · α − σ x_0
        def forward(self, xt, t, labels=None):
            ab = schedule.alpha_bars[t].view(-1, 1, 1, 1).float()
            eps = (xt - ab.sqrt() * 0.3) / (1 - ab).sqrt()
            return ab.sqrt() * eps - (1 - ab).sqrt() * 0.3

    x0 = torch.full((32, 1, 8, 8), 0.3)
    exact = diffusion_loss_terms(
        OracleV(), schedule, x0, None, torch.Generator().manual_seed(1), "v", min_snr_gamma=5.0
    )
    assert exact.eps_mse.max().item() < 1e-6 and exact.loss.item() < 1e-6
