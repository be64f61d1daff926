import pytest
import torch
from torch import nn

from ddpm_core.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    guided_output,
    make_sampler,
    sample,
    trailing_timesteps,
)
from ddpm_core.schedule import make_schedule


class ConstantDataEps(nn.Module):
    """The exact ε-predictor when every image is the constant `c` (per class: c[y])."""

    def __init__(self, schedule, c, null_value=0.0):
        super().__init__()
        self.ab = schedule.alpha_bars.float()
        self.c = torch.as_tensor(c, dtype=torch.float32)
        self.null_value = null_value
        self.null_class = len(self.c) if self.c.dim() else None
        self.calls = 0
        self.batch_sizes = []

    def forward(self, xt, t, labels=None):
        self.calls += 1
        self.batch_sizes.append(xt.shape[0])
        ab = self.ab[t].view(-1, 1, 1, 1)
        if self.c.dim() == 0:
            target = self.c
        else:
            table = torch.cat([self.c, torch.tensor([self.null_value])])
            target = table[labels].view(-1, 1, 1, 1)
        return (xt - ab.sqrt() * target) / (1 - ab).sqrt()


@pytest.mark.parametrize(
    "sampler_name,steps", [("ddpm", 1000), ("ddim", 50), ("ddim", 1), ("dpmpp2m", 10), ("dpmpp2m", 1)]
)
def test_samplers_recover_a_point_mass(sampler_name, steps):
    schedule = make_schedule("linear", 1000)
    model = ConstantDataEps(schedule, 0.4)
    sampler = make_sampler(sampler_name, schedule, steps, 0.0, "eps", offset_noise=0.0)
    out = sample(model, sampler, (4, 1, 3, 3), torch.Generator().manual_seed(0))
    assert torch.allclose(out, torch.full_like(out, 0.4), atol=1e-4)
    assert model.calls == len(sampler.timesteps)


class ConstantDataV(ConstantDataEps):
    """The exact v-predictor for the same data: v = √ᾱ ε − √(1 − ᾱ) c, with ε from the parent."""

    def forward(self, xt, t, labels=None):
        ab = self.ab[t].view(-1, 1, 1, 1)
        eps = super().forward(xt, t, labels)
        target = (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * target


@pytest.mark.parametrize("offset_noise", [0.0, 0.3])
@pytest.mark.parametrize("sampler_name,steps", [("ddpm", 1000), ("ddim", 50), ("dpmpp2m", 10), ("dpmpp2m", 1)])
def test_samplers_recover_a_point_mass_from_a_v_network(sampler_name, steps, offset_noise):
    # Unclipped (make_sampler clips only for ε), so the point mass must come from the math;
    # the exact predictor reads ε off x_t whatever law it was drawn from, offset or not.
    schedule = make_schedule("linear", 1000)
    sampler = make_sampler(sampler_name, schedule, steps, 0.0, "v", offset_noise=offset_noise)
    assert not sampler.clip_x0
    out = sample(ConstantDataV(schedule, 0.4), sampler, (4, 1, 3, 3), torch.Generator().manual_seed(0))
    assert torch.allclose(out, torch.full_like(out, 0.4), atol=1e-4)


def test_sampling_starts_from_the_noise_the_network_was_trained_against():
    # x_T is drawn like training's ε: with offset c each image's mean has variance c² + 1/HW.
    schedule, c, n = make_schedule("linear", 1000), 0.5, 4000
    starts = []
    for offset in (0.0, c):
        sampler = make_sampler("ddim", schedule, 1, 0.0, "v", offset_noise=offset)
        sample(ConstantDataV(schedule, 0.4), sampler, (n, 1, 4, 4), torch.Generator().manual_seed(0),
               on_step=lambda k, x, x0: starts.append(x) if k == 0 else None)  # fmt: skip
    plain, shifted = (x.mean((1, 2, 3)).var().item() for x in starts)
    assert abs(plain - 1 / 16) < 0.01 and abs(shifted - (c**2 + 1 / 16)) < 0.02


def test_ddim_with_eta_one_over_all_steps_is_ddpm():
    schedule = make_schedule("linear", 1000)
    torch.manual_seed(0)
    net = nn.Conv2d(1, 1, 3, padding=1)
    model = lambda x, t, labels: torch.tanh(net(x)) * (1 + t.view(-1, 1, 1, 1) / 1000)  # noqa: E731
    shape = (3, 1, 6, 6)
    with torch.no_grad():
        a = sample(model, DDPMSampler(schedule), shape, torch.Generator().manual_seed(7))
        b = sample(model, DDIMSampler(schedule, 1000, eta=1.0), shape, torch.Generator().manual_seed(7))
    assert torch.allclose(a, b, atol=1e-5)


def test_ddim_single_step_equals_ddpm_step_algebra():
    schedule = make_schedule("cosine", 1000)
    xt = torch.randn(2, 1, 4, 4)
    eps = torch.randn_like(xt)
    noise = torch.randn_like(xt)
    for i in (0, 500, 998, 999):
        ddpm = DDPMSampler(schedule).step(xt, eps, i, noise)
        ddim = DDIMSampler(schedule, 1000, eta=1.0).step(xt, eps, i, noise)
        assert torch.allclose(ddpm, ddim, atol=1e-5)


def test_ddim_timesteps_are_trailing_and_within_range():
    schedule = make_schedule("linear", 1000)
    assert DDIMSampler(schedule, 1000).timesteps.tolist() == list(range(999, -1, -1))
    ts = DDIMSampler(schedule, 50).timesteps
    assert ts[0] == 999 and ts[-1] == 19 and len(ts) == 50
    assert (ts.diff() == -20).all()
    assert DDIMSampler(schedule, 1).timesteps.tolist() == [999]
    with pytest.raises(ValueError):
        DDIMSampler(schedule, 1001)


def test_t_min_moves_the_last_step_and_keeps_the_spacing_even():
    schedule = make_schedule("linear", 1000)
    # None is trailing's own end, T/steps − 1; any t_min ends there, spaced evenly from T − 1.
    assert trailing_timesteps(1000, 10, None).tolist() == list(range(999, 0, -100))
    assert trailing_timesteps(1000, 10, 99).tolist() == list(range(999, 0, -100))
    assert trailing_timesteps(1000, 10, 10).tolist() == [999, 889, 779, 669, 559, 450, 340, 230, 120, 10]
    assert trailing_timesteps(1000, 1000, 0).tolist() == list(range(999, -1, -1))
    assert trailing_timesteps(1000, 1, 10).tolist() == [999]
    assert DPMSolverPPSampler(schedule, 10, t_min=10).timesteps[-1] == 10
    assert make_sampler("ddim", schedule, 4, 0.0, "v", offset_noise=0.0, t_min=0).timesteps.tolist() == [
        999,
        666,
        333,
        0,
    ]
    assert (
        len(make_sampler("ddpm", schedule, 10, 0.0, "v", offset_noise=0.0, t_min=10).timesteps) == 1000
    )  # DDPM visits all
    with pytest.raises(ValueError, match=r"sample.t_min\) must be in \[0, 990\] for 10 steps of 1000, got 991"):
        trailing_timesteps(1000, 10, 991)


@pytest.mark.parametrize("t_min", [0, 10, 300])
def test_a_point_mass_is_recovered_whatever_the_last_step(t_min):
    # DPM-Solver++ returns the x̂₀ of its last step: exact for the exact predictor at any t_min.
    schedule = make_schedule("linear", 1000)
    sampler = make_sampler("dpmpp2m", schedule, 10, 0.0, "v", offset_noise=0.1, t_min=t_min)
    out = sample(ConstantDataV(schedule, -0.7), sampler, (4, 1, 3, 3), torch.Generator().manual_seed(0))
    assert sampler.timesteps[-1] == t_min
    assert torch.allclose(out, torch.full_like(out, -0.7), atol=1e-4)


def test_deterministic_ddim_ignores_noise():
    schedule = make_schedule("linear", 1000)
    sampler = DDIMSampler(schedule, 10, eta=0.0)
    xt, eps = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    assert torch.equal(sampler.step(xt, eps, 3, torch.zeros_like(xt)), sampler.step(xt, eps, 3, torch.randn_like(xt)))


def test_guidance_one_is_a_single_conditional_pass():
    schedule = make_schedule("linear", 1000)
    model = ConstantDataEps(schedule, [0.2, -0.5])
    xt, t, y = torch.randn(4, 1, 2, 2), torch.full((4,), 500), torch.tensor([0, 1, 0, 1])
    eps = guided_output(model, xt, t, y, 1.0)
    assert model.calls == 1 and model.batch_sizes == [4]
    assert torch.equal(eps, model(xt, t, y))


def test_guidance_combines_conditional_and_null_in_one_batch():
    schedule = make_schedule("linear", 1000)
    model = ConstantDataEps(schedule, [0.2, -0.5], null_value=0.0)
    xt, t, y = torch.randn(4, 1, 2, 2), torch.full((4,), 500), torch.tensor([0, 1, 0, 1])
    eps = guided_output(model, xt, t, y, 3.0)
    assert model.batch_sizes == [8]
    e_cond, e_null = model(xt, t, y), model(xt, t, torch.full_like(y, 2))
    assert torch.allclose(eps, e_null + 3.0 * (e_cond - e_null), atol=1e-6)
    model.batch_sizes.clear()
    assert torch.allclose(guided_output(model, xt, t, y, 0.0), e_null)
    assert model.batch_sizes == [4]


def test_guided_sampling_reaches_the_extrapolated_class_value():
    # With exact ε for per-class constants, guidance w moves x̂_0 to null + w (c_y − null).
    schedule = make_schedule("linear", 1000)
    model = ConstantDataEps(schedule, [0.2, -0.3], null_value=0.0)
    labels = torch.tensor([0, 1])
    out = sample(model, DDIMSampler(schedule, 20), (2, 1, 2, 2), torch.Generator().manual_seed(0), labels, 2.0)
    assert torch.allclose(out[0], torch.full((1, 2, 2), 0.4), atol=1e-4)
    assert torch.allclose(out[1], torch.full((1, 2, 2), -0.6), atol=1e-4)


def test_guidance_interval_guides_only_the_steps_inside_it():
    # Exact ε for per-class constants: each step's x̂_0 is the guided value null + w (c_y − null)
    # inside the interval and c_y outside it, and DDIM ends at the last step's x̂_0.
    schedule = make_schedule("linear", 1000)
    model = ConstantDataEps(schedule, [0.2, -0.3], null_value=0.0)
    labels = torch.tensor([0, 1])
    sampler = DDIMSampler(schedule, 20)  # 999, 949, ..., 49
    assert sampler.timesteps[-1].item() == 49

    def draw(interval):
        model.batch_sizes.clear()
        gen = torch.Generator().manual_seed(0)
        return sample(model, sampler, (2, 1, 2, 2), gen, labels, 2.0, guidance_interval=interval)

    last_only = draw((0, 49))
    assert torch.allclose(last_only[:, 0, 0, 0], torch.tensor([0.4, -0.6]), atol=1e-4)
    assert model.batch_sizes == [2] * 19 + [4]  # unguided steps: one conditional pass, no null pass
    all_but_last = draw((50, 999))
    assert torch.allclose(all_but_last[:, 0, 0, 0], torch.tensor([0.2, -0.3]), atol=1e-4)
    assert model.batch_sizes == [4] * 19 + [2]
    assert torch.equal(draw((0, 999)), draw(None))  # an interval covering every step is plain CFG


def test_same_generator_seed_gives_same_samples():
    schedule = make_schedule("linear", 100)
    torch.manual_seed(0)
    net = nn.Conv2d(1, 1, 3, padding=1)
    model = lambda x, t, labels: net(x)  # noqa: E731
    a = sample(model, DDIMSampler(schedule, 10, eta=0.5), (2, 1, 5, 5), torch.Generator().manual_seed(3))
    b = sample(model, DDIMSampler(schedule, 10, eta=0.5), (2, 1, 5, 5), torch.Generator().manual_seed(3))
    c = sample(model, DDIMSampler(schedule, 10, eta=0.5), (2, 1, 5, 5), torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _ode_endpoints(sampler, schedule, mu, s, x_T):
    """Run `sampler` with the exact ε of data N(mu, s²), in float64, without clipping."""
    ab = schedule.alpha_bars
    eps = lambda x, t: (1 - ab[t]).sqrt() * (x - ab[t].sqrt() * mu) / (ab[t] * s * s + 1 - ab[t])  # noqa: E731
    x = x_T
    for i, t in enumerate(sampler.timesteps.tolist()):
        x = sampler.step(x, eps(x, t), i, torch.zeros_like(x))
    return x


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_dpm_solver_is_second_order_on_gaussian_data(schedule_name):
    # For data N(mu, s²) the probability-flow ODE has the closed-form solution
    # x_t = √ᾱ_t mu + √(ᾱ_t s² + 1 − ᾱ_t) z: x_T maps to x_0 = mu + s z.
    schedule = make_schedule(schedule_name, 1000)
    mu, s = 0.3, 0.5
    x_T = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab_T = schedule.alpha_bars[-1]
    exact = mu + s * (x_T - ab_T.sqrt() * mu) / (ab_T * s * s + 1 - ab_T).sqrt()

    def error(sampler):
        return (_ode_endpoints(sampler, schedule, mu, s, x_T) - exact).abs().max().item()

    ddim = [error(DDIMSampler(schedule, n, clip_x0=False)) for n in (10, 20)]
    dpm = [error(DPMSolverPPSampler(schedule, n, clip_x0=False)) for n in (10, 20)]
    assert 1.6 < ddim[0] / ddim[1] < 2.4  # first order: twice the steps, half the error
    assert dpm[0] / dpm[1] > 4  # faster than first order
    assert dpm[1] < ddim[1] / 3 and dpm[1] < 0.07


def test_dpm_solver_first_and_single_steps_are_ddim_steps():
    schedule = make_schedule("cosine", 1000)
    xt, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    zeros = torch.zeros_like(xt)
    assert torch.allclose(
        DPMSolverPPSampler(schedule, 10).step(xt, eps, 0, zeros),
        DDIMSampler(schedule, 10).step(xt, eps, 0, zeros),
        atol=1e-5,
    )
    assert torch.allclose(
        DPMSolverPPSampler(schedule, 1).step(xt, eps, 0, zeros),
        DDIMSampler(schedule, 1).step(xt, eps, 0, zeros),
        atol=1e-6,
    )


def test_dpm_solver_restarts_its_history_for_each_loop():
    schedule = make_schedule("linear", 1000)
    torch.manual_seed(0)
    net = nn.Conv2d(1, 1, 3, padding=1)
    model = lambda x, t, labels: torch.tanh(net(x))  # noqa: E731
    sampler = DPMSolverPPSampler(schedule, 8)
    with torch.no_grad():
        a = sample(model, sampler, (2, 1, 5, 5), torch.Generator().manual_seed(1))
        b = sample(model, sampler, (2, 1, 5, 5), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


class Offset(nn.Module):
    """A network whose output is `model`'s plus a constant: a 'worse version' with a known gap."""

    def __init__(self, model, offset):
        super().__init__()
        self.model, self.offset, self.calls = model, offset, 0
        self.null_class = model.null_class

    def forward(self, xt, t, labels=None):
        self.calls += 1
        return self.model(xt, t, labels) + self.offset


def test_autoguidance_weight_one_is_exactly_the_model_and_zero_exactly_the_guide():
    schedule = make_schedule("linear", 1000)
    model = ConstantDataEps(schedule, 0.3)
    guide = Offset(ConstantDataEps(schedule, 0.3), 0.25)
    xt, t = torch.randn(4, 1, 2, 2), torch.full((4,), 400)
    assert torch.equal(guided_output(model, xt, t, None, 1.0, guide, 1.0), model(xt, t))
    assert guide.calls == 0  # weight 1 never runs the guide
    assert torch.equal(guided_output(model, xt, t, None, 1.0, guide, 0.0), guide(xt, t))
    # G + w (M − G): the guide's gap of 0.25, extrapolated away from it
    out = guided_output(model, xt, t, None, 1.0, guide, 2.5)
    assert torch.allclose(out, model(xt, t) - 1.5 * 0.25, atol=1e-6)


def test_autoguidance_combines_with_classifier_free_guidance():
    schedule = make_schedule("linear", 1000)
    model = ConstantDataEps(schedule, [0.2, -0.5], null_value=0.0)
    guide = Offset(ConstantDataEps(schedule, [0.2, -0.5], null_value=0.0), -0.1)
    xt, t, y = torch.randn(4, 1, 2, 2), torch.full((4,), 700), torch.tensor([0, 1, 0, 1])
    m_y, m_null, g_y = model(xt, t, y), model(xt, t, torch.full_like(y, 2)), guide(xt, t, y)
    out = guided_output(model, xt, t, y, 3.0, guide, 2.0)
    assert torch.allclose(out, g_y + 2.0 * (m_y - g_y) + (3.0 - 1) * (m_y - m_null), atol=1e-6)
    # autoguidance 1: exactly today's classifier-free guidance
    assert torch.equal(guided_output(model, xt, t, y, 3.0, guide, 1.0), guided_output(model, xt, t, y, 3.0))
    # guidance 1, autoguidance 0: exactly the guide's conditional output
    assert torch.equal(guided_output(model, xt, t, y, 1.0, guide, 0.0), g_y)


def test_autoguided_sampling_extrapolates_the_guides_x0():
    # Exact ε for the constant 0.3 as the model, exact ε for 0.1 as the guide: at weight w
    # every step's x̂_0 is 0.1 + w (0.3 − 0.1), so DDIM ends there.
    schedule = make_schedule("linear", 1000)
    model, guide = ConstantDataEps(schedule, 0.3), ConstantDataEps(schedule, 0.1)
    out = sample(model, DDIMSampler(schedule, 20), (2, 1, 2, 2), torch.Generator().manual_seed(0), guide=guide,
                 autoguidance=1.5)  # fmt: skip
    assert torch.allclose(out, torch.full_like(out, 0.4), atol=1e-4)
