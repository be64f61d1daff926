"""Noise schedules: β_t and ᾱ_t = Π_{s≤t} (1 − β_s) as plain tensors.

Index convention used everywhere in ddpm_core: array index i ∈ [0, T) is the paper's
timestep t = i + 1. So `alpha_bars[0]` is ᾱ_1 (almost no noise) and `alpha_bars[T-1]`
is ᾱ_T (almost pure noise). "ᾱ before the first step" is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020: β rises linearly from 1e-4 to 0.02 over T = 1000 steps.

    For T ≠ 1000 both ends scale by 1000/T (as in Nichol & Dhariwal), so ᾱ_T stays near 0.
    """
    scale = 1000 / timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: torch.Tensor, timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021: ᾱ(t) = f(t) / f(0), f(t) = cos²(π/2 · (t/T + s) / (1 + s))."""
    f = lambda u: torch.cos((u / timesteps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t.to(torch.float64)) / f(torch.zeros((), dtype=torch.float64))


def cosine_betas(timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = 1 − ᾱ(t)/ᾱ(t−1), clipped at `max_beta` to avoid a singularity at t = T."""
    t = torch.arange(timesteps + 1, dtype=torch.float64)
    alpha_bar = cosine_alpha_bar(t, timesteps)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


@dataclass(frozen=True)
class NoiseSchedule:
    """β_t, α_t = 1 − β_t and ᾱ_t for t = 1..T, stored at indices 0..T-1 (float64)."""

    betas: torch.Tensor

    @property
    def timesteps(self) -> int:
        return self.betas.numel()

    @property
    def alphas(self) -> torch.Tensor:
        return 1 - self.betas

    @property
    def alpha_bars(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    def alpha_bar_at(self, index: torch.Tensor) -> torch.Tensor:
        """ᾱ at integer indices, with index −1 meaning "before any noise" (ᾱ = 1)."""
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars])
        return padded[index + 1]


def make_schedule(name: str, timesteps: int) -> NoiseSchedule:
    if name == "linear":
        return NoiseSchedule(linear_betas(timesteps))
    if name == "cosine":
        return NoiseSchedule(cosine_betas(timesteps))
    raise ValueError(f"unknown noise schedule {name!r}; choose 'linear' or 'cosine'")
