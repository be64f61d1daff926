"""Pictures of samples: grids as uint8 arrays, ready for PNG files and MLflow."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.utils import make_grid

from ddpm_core.data import to_uint8


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """(N, 1, H, W) images in [−1, 1] → one (rows·H, nrow·W) uint8 array, white on black."""
    grid = make_grid(images.float().cpu(), nrow=nrow, padding=padding, pad_value=-1.0)
    return to_uint8(grid[0]).numpy()
