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


def eps_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Ho et al.'s simple loss: ‖ε − ε_θ(x_t, t)‖² with t uniform over all T steps.

    Timesteps and noise are drawn from `generator` on the CPU, so a run is reproducible
    on any device.
    """
    index = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    xt = q_sample(schedule, x0, index, noise)
    return F.mse_loss(model(xt, index, labels).float(), noise)
