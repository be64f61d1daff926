"""Pixel statistics of uint8 images: how clean the background is, and how far the
distribution of intensities is from the real data's.

MNIST is mostly exact black (81.8 % of the test set's pixels are 0); a diffusion model
leaves its background a few grey levels above it, which FID barely sees. These numbers
see it. Pure tensor functions: uint8 images of any shape in, floats out.
"""

from __future__ import annotations

import torch

LEVELS = 256


def zero_share(images: torch.Tensor) -> float:
    """The share of pixels that are exactly 0."""
    return (images == 0).double().mean().item()


def intensity_histogram(images: torch.Tensor) -> torch.Tensor:
    """The 256-bin histogram of uint8 pixel values, normalised to sum to 1 (float64)."""
    counts = torch.bincount(images.flatten().long(), minlength=LEVELS).double()
    return counts / counts.sum()


def histogram_tv(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Total-variation distance ½ Σ_v |p(v) − q(v)| between the intensity histograms of two
    image sets: 0 when they are the same, 1 when no value occurs in both. Equal to the
    share of pixels that would have to change value to turn one histogram into the other.
    """
    return 0.5 * (intensity_histogram(images) - intensity_histogram(reference)).abs().sum().item()


def pixel_metrics(uncond: torch.Tensor, cond: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """The metrics.json keys: exact-zero shares of both sample sets and of `real`, and each
    sample set's histogram TV distance from `real`."""
    return {
        "zero_pixels_uncond": zero_share(uncond),
        "zero_pixels_cond": zero_share(cond),
        "zero_pixels_real": zero_share(real),
        "pixel_hist_tv_uncond": histogram_tv(uncond, real),
        "pixel_hist_tv_cond": histogram_tv(cond, real),
    }
