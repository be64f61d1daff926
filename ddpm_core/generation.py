"""Drawing many images from a trained model: batches, balanced labels, a progress bar."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
from tqdm import tqdm

from ddpm_core import hardware
from ddpm_core.config import ModelParams
from ddpm_core.data import NUM_CLASSES, to_uint8
from ddpm_core.errors import DataError
from ddpm_core.files import load_safe, write_atomic
from ddpm_core.samplers import sample
from ddpm_core.unet import UNet, build_unet


def load_unet(path: Path, params: ModelParams, conditional: bool, device: torch.device) -> UNet:
    """The EMA weights of a trained model, from a state_dict file, ready to sample."""
    model = build_unet(params, NUM_CLASSES if conditional else None)
    model.load_state_dict(load_safe(path))
    return hardware.place_model(model, device, hardware.sampling_precision(device)).eval().requires_grad_(False)


def balanced_labels(n: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """0, 1, …, 9, 0, 1, … : every class n/10 times (the first n % 10 classes once more)."""
    return torch.arange(n) % num_classes


def generate(
    model: UNet,
    sampler,
    n: int,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    desc: str = "sampling",
) -> torch.Tensor:
    """`n` uint8 images (n, 1, 28, 28), in batches; one generator feeds every batch, so
    the result depends on the seed and the batch size, not on the device."""
    batches = []
    with tqdm(total=n, desc=desc, unit="img", mininterval=1.0) as bar:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            batch_labels = labels[start : start + count] if labels is not None else None
            images = sample(model, sampler, (count, 1, 28, 28), generator, batch_labels, guidance, device, autocast)
            batches.append(to_uint8(images).cpu())
            bar.update(count)
    return torch.cat(batches)


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """Write `images` (uint8, N×1×28×28) as an .npz of `images` (N×28×28) and, if given, `labels` (int64)."""
    arrays = {"images": images[:, 0].numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    write_atomic(path, lambda f: np.savez_compressed(f, **arrays))


def sweep_samples_path(samples_dir: Path, guidance: float) -> Path:
    """Where the guidance sweep's conditional samples at weight `guidance` live."""
    return Path(samples_dir) / "sweep" / f"guidance_{guidance:g}.npz"


def load_samples(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read what `save_samples` wrote: images as uint8 N×1×28×28, and labels or None."""
    try:
        with np.load(path) as f:
            labels = torch.from_numpy(f["labels"]) if "labels" in f.files else None
            return torch.from_numpy(f["images"])[:, None], labels
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the sample stage first") from None
