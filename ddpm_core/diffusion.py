"""The forward process q(x_t | x_0) in closed form, what the network predicts (ε or v),
and the training loss.

With α = √ᾱ_t and σ = √(1 − ᾱ_t), x_t = α x_0 + σ ε. The network predicts either ε
(Ho et al. 2020) or v = α ε − σ x_0 (Salimans & Ho 2022); both give x̂_0 and ε̂ in
closed form (`x0_and_eps`), which is all the samplers use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ddpm_core.schedule import NoiseSchedule

PREDICTIONS = ("eps", "v")


def _per_sample(values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather `values[index]` and shape it to broadcast over a batch like `like`."""
    gathered = values.to(like.device)[index].to(like.dtype)
    return gathered.view(-1, *([1] * (like.dim() - 1)))


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """The noise ε of the forward process, on the CPU: i.i.d. N(0, 1) per pixel, plus with
    `offset` > 0 one N(0, offset²) shift per image and channel ("offset noise", Guttenberg
    2023), so that ε ~ N(0, I + offset² 11ᵀ) within each image and channel.

    Why: with i.i.d. noise the network never sees an image whose level as a whole is off,
    and GroupNorm hides such a level from it, so it cannot remove one; a sampling path that
    drifts a few grey levels at high noise keeps that grey background to the end
    (docs/performance.md). With the shift in training it learns to take it out. At
    offset 0 nothing more is drawn from `generator`: the same noise as before, byte for byte.
    """
    noise = torch.randn(shape, generator=generator)
    if offset > 0:
        noise = noise + offset * torch.randn((*shape[:2], *([1] * (len(shape) - 2))), generator=generator)
    return noise


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, for each sample's own timestep index."""
    alpha_bar = _per_sample(schedule.alpha_bars, index, x0)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def v_target(schedule: NoiseSchedule, x0: torch.Tensor, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0: the velocity of x_t on the circle α² + σ² = 1."""
    alpha_bar = _per_sample(schedule.alpha_bars, index, x0)
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


def x0_and_eps(
    alpha_bar: torch.Tensor, xt: torch.Tensor, output: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from the network's output at noise level ᾱ (a scalar or broadcastable).

    ε-prediction: x̂_0 = (x_t − σ ε̂) / α.  v-prediction: x̂_0 = α x_t − σ v̂, ε̂ = σ x_t + α v̂.
    """
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "eps":
        return (xt - sigma * output) / alpha, output
    if prediction == "v":
        return alpha * xt - sigma * output, sigma * xt + alpha * output
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def predicted_x0(schedule: NoiseSchedule, xt: torch.Tensor, index: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Invert q_sample for x_0 given a noise estimate: x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t."""
    return x0_and_eps(_per_sample(schedule.alpha_bars, index, xt), xt, eps, "eps")[0]


def min_snr_weights(
    schedule: NoiseSchedule, index: torch.Tensor, gamma: float, prediction: str = "eps"
) -> torch.Tensor:
    """Hang et al. 2023 (Min-SNR-γ): the weight of the ε or v loss at each timestep.

    SNR_t = ᾱ_t / (1 − ᾱ_t). In terms of x̂_0 every variant weighs ‖x_0 − x̂_0‖² by
    min(SNR_t, γ); since ‖ε − ε̂‖² = SNR_t ‖x_0 − x̂_0‖² and ‖v − v̂‖² = (SNR_t + 1) ‖x_0 − x̂_0‖²,
    that is w_t = min(SNR_t, γ) / SNR_t for ε and min(SNR_t, γ) / (SNR_t + 1) for v.
    Low-noise steps (SNR > γ) are down-weighted, so they stop dominating a short run.
    """
    alpha_bar = schedule.alpha_bars[index.cpu()]
    snr = alpha_bar / (1 - alpha_bar)
    return (snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)).float()


@dataclass(frozen=True)
class LossTerms:
    """One batch's training loss and what it is made of.

    `loss` is the scalar that is optimised; `index` the timestep index of each sample and
    `eps_mse` each sample's unweighted ‖ε − ε̂‖² (ε̂ from the output in closed form, detached),
    the same diagnostic whatever the network predicts, for the loss-by-noise-level curves."""

    loss: torch.Tensor
    index: torch.Tensor
    eps_mse: torch.Tensor


def diffusion_loss_terms(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
    prediction: str = "eps",
    min_snr_gamma: float | None = None,
    offset_noise: float = 0.0,
    global_batch: int | None = None,
    rows: slice = slice(None),
) -> LossTerms:
    """‖target − net(x_t, t)‖², target ε (Ho et al.'s simple loss) or v, averaged over the
    batch, with t uniform over all T steps and each sample weighted by `min_snr_weights`
    when `min_snr_gamma` is set.

    Timesteps and noise are drawn from `generator` on the CPU, so a run is reproducible
    on any device. In a process that trains on `rows` of a `global_batch` (torch.distributed,
    `x0` holds only those rows) they are drawn for the whole global batch and sliced: every
    process draws alike, and the rows get the noise they would get in a single process.
    """
    n = x0.shape[0] if global_batch is None else global_batch
    index = torch.randint(0, schedule.timesteps, (n,), generator=generator)[rows]
    noise = draw_noise((n, *x0.shape[1:]), generator, offset_noise)[rows].to(x0.device)
    t = index.to(x0.device)
    xt = q_sample(schedule, x0, t, noise)
    output = model(xt, t, labels).float()
    target = noise if prediction == "eps" else v_target(schedule, x0, t, noise)
    per_sample = (output - target).pow(2).flatten(1).mean(1)
    with torch.no_grad():
        eps_hat = x0_and_eps(_per_sample(schedule.alpha_bars, t, output), xt.float(), output, prediction)[1]
        eps_mse = (eps_hat - noise).pow(2).flatten(1).mean(1)
    if per_sample.numel() == 0:  # an empty share of a global batch (torch.distributed): no loss, no gradient
        loss = per_sample.sum()
    elif min_snr_gamma is None:
        loss = per_sample.mean()
    else:
        loss = (min_snr_weights(schedule, index, min_snr_gamma, prediction).to(x0.device) * per_sample).mean()
    return LossTerms(loss, t, eps_mse)


def diffusion_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
    """The scalar of `diffusion_loss_terms` (same arguments)."""
    return diffusion_loss_terms(*args, **kwargs).loss
