"""The forward process q(x_t | x_0) in closed form, and the ε-prediction training loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_core.schedule import NoiseSchedule


def _per_sample(values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather `values[index]` and shape it to broadcast over a batch like `like`."""
    gathered = values.to(like.device)[index].to(like.dtype)
    return gathered.view(-1, *([1] * (like.dim() - 1)))


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, for each sample's own timestep index."""
    alpha_bar = _per_sample(schedule.alpha_bars, index, x0)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def predicted_x0(schedule: NoiseSchedule, xt: torch.Tensor, index: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Invert q_sample for x_0 given a noise estimate: x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t."""
    alpha_bar = _per_sample(schedule.alpha_bars, index, xt)
    return (xt - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def min_snr_weights(schedule: NoiseSchedule, index: torch.Tensor, gamma: float) -> torch.Tensor:
    """Hang et al. 2023 (Min-SNR-γ) for ε-prediction: w_t = min(SNR_t, γ) / SNR_t.

    SNR_t = ᾱ_t / (1 − ᾱ_t). Low-noise steps (SNR > γ) are down-weighted, so they stop
    dominating the gradient of a short run; steps with SNR ≤ γ keep weight 1.
    """
    alpha_bar = schedule.alpha_bars[index.cpu()]
    snr = alpha_bar / (1 - alpha_bar)
    return (snr.clamp(max=gamma) / snr).float()


def eps_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Ho et al.'s simple loss ‖ε − ε_θ(x_t, t)‖² with t uniform over all T steps,
    each sample weighted by `min_snr_weights` when `min_snr_gamma` is set.

    Timesteps and noise are drawn from `generator` on the CPU, so a run is reproducible
    on any device.
    """
    index = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = index.to(x0.device)
    eps = model(q_sample(schedule, x0, t, noise), t, labels).float()
    if min_snr_gamma is None:
        return F.mse_loss(eps, noise)
    per_sample = (eps - noise).pow(2).flatten(1).mean(1)
    return (min_snr_weights(schedule, index, min_snr_gamma).to(x0.device) * per_sample).mean()
