"""Reverse-process samplers and classifier-free guidance.

A sampler is one object per method (as in diffusers' schedulers): it knows which
timestep indices it visits and how to take one step from x_t to the next, given the
model's noise estimate ε. It holds no network; `sample()` runs the loop.

All samplers work on the network's x̂_0 (from its ε or v output, `diffusion.x0_and_eps`),
optionally clipped to the data range [−1, 1], and on the ε consistent with that x̂_0.
With that convention DDIM with η = 1 over all T steps is exactly DDPM with the posterior
variance β̃_t. Like diffusers' schedulers, a sampler knows what the network predicts
(`prediction`: "eps" or "v").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn

from ddpm_core.diffusion import draw_noise, x0_and_eps
from ddpm_core.schedule import NoiseSchedule


def _x0_and_eps(
    alpha_bar: torch.Tensor, xt: torch.Tensor, output: torch.Tensor, clip: bool, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    x0, eps = x0_and_eps(alpha_bar, xt, output, prediction)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (xt - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    return x0, eps


class DDPMSampler:
    """Ho et al. 2020, ancestral sampling over all T steps with σ_t² = β̃_t."""

    def __init__(
        self, schedule: NoiseSchedule, clip_x0: bool = True, prediction: str = "eps", offset_noise: float = 0.0
    ):
        self.schedule = schedule
        self.clip_x0 = clip_x0
        self.prediction = prediction
        self.offset_noise = offset_noise
        self.timesteps = torch.arange(schedule.timesteps - 1, -1, -1)

    def step(self, xt: torch.Tensor, output: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        t = int(self.timesteps[i])
        ab_t = self.schedule.alpha_bar_at(torch.tensor(t))
        ab_prev = self.schedule.alpha_bar_at(torch.tensor(t - 1))
        beta_t = self.schedule.betas[t]
        x0, _ = _x0_and_eps(ab_t, xt, output, self.clip_x0, self.prediction)
        # Posterior q(x_{t-1} | x_t, x_0): mean c0·x_0 + ct·x_t, variance β̃_t.
        c0 = ab_prev.sqrt() * beta_t / (1 - ab_t)
        ct = (1 - beta_t).sqrt() * (1 - ab_prev) / (1 - ab_t)
        var = (1 - ab_prev) / (1 - ab_t) * beta_t
        return (c0 * x0 + ct * xt + var.sqrt() * noise).to(xt.dtype)


def trailing_timesteps(timesteps: int, steps: int, last: int | None = None) -> torch.Tensor:
    """`steps` indices spaced evenly from T − 1 ("trailing", Lin et al. 2024: the first step
    starts from pure noise) down to `last`, which is T/steps − 1 when None: 1000 → 50
    gives 999, 979, …, 19, and 1000 → 10 gives 999, 899, …, 99.

    `last` (`sample.t_min`) moves the final step closer to the data: the sampler returns
    the network's x̂₀ at the last timestep it visits, and that estimate is only as clean as
    the noise it removes there (10 → 10 gives 999, 889, …, 120, 10; docs/performance.md).
    One step is always T − 1 alone.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"sampling steps must be in [1, {timesteps}], got {steps}")
    if last is None or steps == 1:
        return (torch.arange(steps, 0, -1, dtype=torch.float64) * (timesteps / steps)).round().long() - 1
    if not 0 <= last <= timesteps - steps:
        raise ValueError(
            f"the last sampling timestep (sample.t_min) must be in [0, {timesteps - steps}] for {steps} steps of {timesteps}, got {last}"
        )
    return torch.linspace(timesteps - 1, last, steps, dtype=torch.float64).round().long()


class _FewStepSampler:
    """Shared by the samplers that visit a subset of the T timesteps."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        clip_x0: bool = True,
        prediction: str = "eps",
        offset_noise: float = 0.0,
        t_min: int | None = None,
    ):
        self.schedule = schedule
        self.clip_x0 = clip_x0
        self.prediction = prediction
        self.offset_noise = offset_noise
        self.timesteps = trailing_timesteps(schedule.timesteps, steps, t_min)

    def _alpha_bars(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ᾱ at step i and at the step after it (1 after the last step)."""
        t_next = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        return self.schedule.alpha_bar_at(self.timesteps[i]), self.schedule.alpha_bar_at(torch.tensor(t_next))


class DDIMSampler(_FewStepSampler):
    """Song et al. 2021 over trailing timesteps; η = 0 is deterministic."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        eta: float = 0.0,
        clip_x0: bool = True,
        prediction: str = "eps",
        offset_noise: float = 0.0,
        t_min: int | None = None,
    ):
        super().__init__(schedule, steps, clip_x0, prediction, offset_noise, t_min)
        self.eta = eta

    def step(self, xt: torch.Tensor, output: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        ab_t, ab_prev = self._alpha_bars(i)
        x0, eps = _x0_and_eps(ab_t, xt, output, self.clip_x0, self.prediction)
        sigma = self.eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
        direction = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
        return (ab_prev.sqrt() * x0 + direction * eps + sigma * noise).to(xt.dtype)


class DPMSolverPPSampler(_FewStepSampler):
    """DPM-Solver++(2M), Lu et al. 2022: a second-order multistep solver of the
    probability-flow ODE, in x̂_0 prediction and log-SNR time λ = log(α/σ), α = √ᾱ, σ = √(1 − ᾱ).

        x_next = (σ_next/σ_t) x_t − α_next (e^{−h} − 1) D,   h = λ_next − λ_t,
        D = (1 + 1/2r) x̂_0(t) − (1/2r) x̂_0(previous step),  r = h_previous / h.

    The first step has no previous x̂_0 and the last one ends at ᾱ = 1 (λ = ∞), so both
    use D = x̂_0: a first-order step, which is exactly a DDIM step with η = 0. The solver is
    multistep, so it keeps the previous x̂_0 between the calls of one sampling loop.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        clip_x0: bool = True,
        prediction: str = "eps",
        offset_noise: float = 0.0,
        t_min: int | None = None,
    ):
        super().__init__(schedule, steps, clip_x0, prediction, offset_noise, t_min)
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (x̂_0, h) of the last step

    def step(self, xt: torch.Tensor, output: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        if i == 0:
            self._previous = None
        ab_t, ab_next = self._alpha_bars(i)
        x0, _ = _x0_and_eps(ab_t, xt, output, self.clip_x0, self.prediction)
        if ab_next == 1:
            self._previous = None
            return x0.to(xt.dtype)
        sigma_t, sigma_next, alpha_next = (1 - ab_t).sqrt(), (1 - ab_next).sqrt(), ab_next.sqrt()
        h = _log_snr(ab_next) - _log_snr(ab_t)
        d = x0
        if self._previous is not None:
            x0_prev, h_prev = self._previous
            half_r_inv = h / (2 * h_prev)
            d = (1 + half_r_inv) * x0 - half_r_inv * x0_prev
        self._previous = (x0, h)
        return (sigma_next / sigma_t * xt - alpha_next * torch.expm1(-h) * d).to(xt.dtype)


def _log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """λ = log(α/σ) = ½ log(ᾱ / (1 − ᾱ))."""
    return 0.5 * (alpha_bar.log() - (1 - alpha_bar).log())


SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
Sampler = DDPMSampler | DDIMSampler | DPMSolverPPSampler


def make_sampler(
    name: str,
    schedule: NoiseSchedule,
    steps: int,
    eta: float,
    prediction: str,
    *,
    offset_noise: float,
    t_min: int | None = None,
) -> Sampler:
    """A sampler by its `sample.sampler` name; `steps` and `t_min` (the last timestep
    visited, `trailing_timesteps`) are ignored by DDPM (always all T).

    `offset_noise` is `diffusion.offset_noise`, the noise the network was trained against:
    the initial x_T and any noise a stochastic step adds are drawn like it (`draw_noise`).

    `prediction` is `diffusion.prediction`, what the network was trained to output. x̂_0 is
    clipped to [−1, 1] at every step for ε only: there x̂_0 = (x_t − σ ε̂)/α divides the
    network's error by α ≈ 0.006 at t = T. A v-network's x̂_0 = α x_t − σ v̂ stays in range
    on its own, and clipping it lifts the background: values below −1 are raised, those
    above stay, so the mean drifts up step after step (exact-zero pixels 31 % clipped
    against 40 % unclipped, at the same FID; docs/performance.md).
    """
    clip = prediction == "eps"
    if name == "ddpm":
        return DDPMSampler(schedule, clip_x0=clip, prediction=prediction, offset_noise=offset_noise)
    if name == "ddim":
        return DDIMSampler(
            schedule, steps, eta, clip_x0=clip, prediction=prediction, offset_noise=offset_noise, t_min=t_min
        )
    if name == "dpmpp2m":
        return DPMSolverPPSampler(
            schedule, steps, clip_x0=clip, prediction=prediction, offset_noise=offset_noise, t_min=t_min
        )
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def guided_output(
    model: nn.Module,
    xt: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    guidance: float,
    guide: nn.Module | None = None,
    autoguidance: float = 1.0,
) -> torch.Tensor:
    """The network output the sampler steps with: classifier-free guidance (Ho & Salimans
    2022) and autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad
    version of itself"), combined as

        D = G(y) + w_ag (M(y) − G(y)) + (w_cfg − 1) (M(y) − M(∅)),

    where M is the model, G the guide (an earlier EMA snapshot of the same training run),
    y the labels (none for the unconditional model, which has no CFG term), w_cfg =
    `guidance` and w_ag = `autoguidance`. w_ag = 1 is plain CFG, ε_∅ + w_cfg (ε_y − ε_∅);
    w_cfg = 1 is plain autoguidance; both 1 is the model alone, w_ag = 0 with w_cfg = 1 the
    guide alone. The same combination of v outputs gives the same x̂_0, since ε̂ is affine
    in v̂ with shared x_t.

    Each network runs once per term it appears in with a non-zero weight: the model's
    conditional and null passes as one batch of twice the size, the guide's on its own.
    """
    use_guide = guide is not None and autoguidance != 1
    use_cfg = labels is not None and guidance != 1
    if use_cfg:
        assert labels is not None
        null_class = model.null_class  # UNet's: the extra row of its class embedding
        assert isinstance(null_class, int)
        null = torch.full_like(labels, null_class)
        if guidance == 0 and not use_guide:
            return model(xt, t, null)
        out_cond, out_null = model(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        cfg_term = (guidance - 1) * (out_cond - out_null)
        if not use_guide:
            return out_null + guidance * (out_cond - out_null)
    else:
        out_cond = model(xt, t, labels)
        if not use_guide:
            return out_cond
    assert guide is not None
    out_guide = guide(xt, t, labels)
    out = out_guide + autoguidance * (out_cond - out_guide)  # w_ag = 0: the guide's output exactly
    return out + cfg_term if use_cfg else out


def guided_timesteps(timesteps: Sequence[int], interval: Sequence[int] | None) -> list[int]:
    """The timesteps among `timesteps` at which CFG applies: those with lo ≤ t ≤ hi for
    `interval` (lo, hi), every one for None."""
    return [t for t in timesteps if interval is None or interval[0] <= t <= interval[1]]


@torch.inference_mode()
def sample(
    model: nn.Module,
    sampler: Sampler,
    shape: tuple[int, ...],
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    on_step: Callable[[int, torch.Tensor, torch.Tensor | None], None] | None = None,
    guide: nn.Module | None = None,
    autoguidance: float = 1.0,
    guidance_interval: Sequence[int] | None = None,
) -> torch.Tensor:
    """Draw `shape` images in [−1, 1]. All noise comes from the CPU `generator`, so the
    same seed gives the same images on any device (up to the device's arithmetic).
    `guidance`, `guide` and `autoguidance` combine as in `guided_output`;
    `guidance_interval` (lo, hi) applies the CFG weight only at the steps whose timestep t
    has lo ≤ t ≤ hi and samples plainly conditionally (w_cfg = 1) at the others
    (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"); None = every step.

    `on_step(k, x, x0)` watches the loop, len(sampler.timesteps) + 1 calls: k = 0 with the
    initial noise (x0 None: nothing predicted yet), then after step k the new x and the
    clean image x̂_0 the model predicted at that step. It changes no result.
    """
    x = draw_noise(shape, generator, sampler.offset_noise).to(device)
    labels = labels.to(device) if labels is not None else None
    if on_step is not None:
        on_step(0, x, None)
    guided = set(guided_timesteps(sampler.timesteps.tolist(), guidance_interval))
    for i, t in enumerate(sampler.timesteps.tolist()):
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        with autocast():
            w_cfg = guidance if t in guided else 1.0
            output = guided_output(model, x, t_batch, labels, w_cfg, guide, autoguidance).float()
        noise = draw_noise(shape, generator, sampler.offset_noise).to(device)
        x_next = sampler.step(x, output, i, noise)
        if on_step is not None:
            x0, _ = _x0_and_eps(
                sampler.schedule.alpha_bar_at(torch.tensor(t)), x, output, sampler.clip_x0, sampler.prediction
            )
            on_step(i + 1, x_next, x0)
        x = x_next
    return x.clamp(-1, 1)
