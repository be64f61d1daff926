"""Denoising animations: the sampling loop recorded step by step, written as a GIF."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm_core.files import write_atomic
from ddpm_core.samplers import Sampler, sample
from ddpm_core.viz import image_grid

SCALE = 2  # a 28-pixel digit is hard to see at its own size
BAR_HEIGHT = 3  # progress bar under the grid, in pixels before scaling
FRAME_MS = 80
LAST_FRAME_MS = 2000  # hold the finished digits before the loop starts again
MAX_FRAMES = 101  # DDPM's 1000 steps are thinned to this many frames
GRAY_LEVELS = 32  # noise compresses badly: 32 levels halve the file, and look the same


class FrameRecorder:
    """An `on_step` hook for `samplers.sample` that keeps every step as a grid (uint8).

    `show` picks what a frame holds: "xt", the noisy image the sampler carries from step
    to step, or "x0", the clean image the model predicts at that step. There are
    steps + 1 frames, the initial noise first, thinned evenly to at most `max_frames`.
    """

    def __init__(self, steps: int, nrow: int, show: str = "xt", max_frames: int = MAX_FRAMES):
        if show not in ("xt", "x0"):
            raise ValueError(f"show must be 'xt' or 'x0', got {show!r}")
        count = min(steps + 1, max_frames)
        self.keep = set(torch.linspace(0, steps, count).round().long().tolist())
        self.nrow = nrow
        self.show = show
        self.frames: list[np.ndarray] = []

    def __call__(self, k: int, x: torch.Tensor, x0: torch.Tensor | None) -> None:
        if k in self.keep:
            self.frames.append(image_grid(x0 if self.show == "x0" and x0 is not None else x, self.nrow))


def _frame(grid: np.ndarray, fraction: float) -> np.ndarray:
    """The grid in GRAY_LEVELS levels, above a bar `fraction` full."""
    step = 255 / (GRAY_LEVELS - 1)
    bar = np.zeros((BAR_HEIGHT, grid.shape[1]))
    bar[:, : round(fraction * grid.shape[1])] = 160
    return (np.round(np.concatenate([grid, bar]) / step) * step).astype(np.uint8)


def gif_size(grid_shape: tuple[int, int], scale: int = SCALE) -> tuple[int, int]:
    """(width, height) of the GIF made from grids of `grid_shape` (rows, columns)."""
    return grid_shape[1] * scale, (grid_shape[0] + BAR_HEIGHT) * scale


def save_gif(path: Path, frames: list[np.ndarray], scale: int = SCALE) -> None:
    """Write grids of one size as a looping GIF, `scale` times larger, the last frame held.

    A bar under the grid grows from frame to frame. Besides showing progress, it keeps
    consecutive frames different, which PIL would otherwise merge into one; that holds
    while the grid is at least as many pixels wide as there are frames.
    """
    last = max(len(frames) - 1, 1)
    images = [
        Image.fromarray(_frame(grid, k / last)).resize(gif_size(grid.shape, scale), Image.Resampling.NEAREST)
        for k, grid in enumerate(frames)
    ]
    durations = [FRAME_MS] * (len(images) - 1) + [LAST_FRAME_MS]
    write_atomic(
        path,
        lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0),
    )


def denoising_gif(
    path: Path,
    model: torch.nn.Module,
    sampler: Sampler,
    labels: torch.Tensor,
    nrow: int,
    generator: torch.Generator,
    guidance: float,
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    show: str = "xt",
    guide: torch.nn.Module | None = None,
    autoguidance: float = 1.0,
) -> torch.Tensor:
    """Sample one image per label in one batch, record the loop, write it to `path` as a
    GIF (grid of `nrow` columns); returns the final images in [−1, 1]. `guide` and
    `autoguidance` as in `samplers.sample`."""
    recorder = FrameRecorder(len(sampler.timesteps), nrow, show)
    shape = (len(labels), 1, 28, 28)
    images = sample(
        model, sampler, shape, generator, labels, guidance, device, autocast,
        on_step=recorder, guide=guide, autoguidance=autoguidance,
    )  # fmt: skip
    save_gif(path, recorder.frames)
    return images
