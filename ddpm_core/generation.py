"""Drawing many images from a trained model: batches, balanced labels, a progress bar."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import ValidationError
from tqdm import tqdm

from ddpm_core import hardware
from ddpm_core.config import DiffusionParams, ModelParams
from ddpm_core.data import DATASETS, NUM_CLASSES, to_uint8
from ddpm_core.errors import DataError, TrackingError
from ddpm_core.files import load_safe, write_atomic
from ddpm_core.samplers import Sampler, make_sampler, sample
from ddpm_core.schedule import make_schedule
from ddpm_core.unet import UNet, build_unet

# The `sample` section of the project's params.yaml, for where none is at hand: weights
# from an MLflow run or registered model (`ddpm generate --run-id/--model`, the pyfunc).
DEFAULT_SAMPLE = {
    "sampler": "dpmpp2m", "steps": 10, "t_min": 10, "guidance": 2.0, "eta": 0.0,
    "autoguidance_uncond": 1.5, "autoguidance_cond": 2.0,
}  # fmt: skip


def load_unet(path: Path, params: ModelParams, conditional: bool, device: torch.device) -> UNet:
    """The EMA weights of a trained model, from a state_dict file, ready to sample."""
    model = build_unet(params, NUM_CLASSES if conditional else None)
    model.load_state_dict(load_safe(path))
    return hardware.place_model(model, device, hardware.sampling_precision(device)).eval().requires_grad_(False)


def _section(flat: dict[str, str], name: str) -> dict:
    """{'model.channels': '[16, 32]'} → {'channels': [16, 32]}: MLflow logs params as text."""
    prefix = f"{name}."
    return {k.removeprefix(prefix): yaml.safe_load(v) for k, v in flat.items() if k.startswith(prefix)}


def params_from_logged(flat: dict[str, str], source: str) -> tuple[ModelParams, DiffusionParams, str]:
    """The architecture, noise schedule and dataset of weights logged to MLflow, from the
    params logged beside them (flat dotted keys, values as text); `source` names them in errors."""
    try:
        # runs from before model.patch_size did not log it (their U-Net ran at 28 pixels)
        model_params = ModelParams.model_validate({"patch_size": 1, **_section(flat, "model")})
        # runs from before v-prediction did not log diffusion.prediction (they predicted ε),
        # nor those from before offset noise diffusion.offset_noise (they had none)
        diffusion = DiffusionParams.model_validate(
            {"prediction": "eps", "offset_noise": 0.0, **_section(flat, "diffusion")}
        )
    except ValidationError as exc:
        raise TrackingError(
            f"{source}: its logged model/diffusion params are unusable ({exc.errors()[0]['msg']})"
        ) from None
    dataset = flat.get("data.dataset", "mnist")  # runs from before Fashion-MNIST did not log it
    if dataset not in DATASETS:
        raise TrackingError(f"{source}: logged data.dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    return model_params, diffusion, dataset


def sampler_for(diffusion: DiffusionParams, sample_params: dict, steps: int | None = None) -> Sampler:
    """The sampler of a `sample` section (params.yaml's, or DEFAULT_SAMPLE) for a model of
    `diffusion`, with `steps` overriding its steps. sample.t_min fits its own steps; with
    other steps it is lowered so that the steps stay distinct."""
    steps = steps or sample_params["steps"]
    t_min = sample_params["t_min"]
    t_min = None if t_min is None or steps == 1 else min(t_min, diffusion.timesteps - steps)
    schedule = make_schedule(diffusion.schedule, diffusion.timesteps)
    return make_sampler(
        sample_params["sampler"],
        schedule,
        steps,
        sample_params["eta"],
        diffusion.prediction,
        offset_noise=diffusion.offset_noise,
        t_min=t_min,
    )


def balanced_labels(n: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """0, 1, …, 9, 0, 1, … : every class n/10 times (the first n % 10 classes once more)."""
    return torch.arange(n) % num_classes


def generate(
    model: UNet,
    sampler: Sampler,
    n: int,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    desc: str = "sampling",
    guide: UNet | None = None,
    autoguidance: float = 1.0,
) -> torch.Tensor:
    """`n` uint8 images (n, 1, 28, 28), in batches; one generator feeds every batch, so
    the result depends on the seed and the batch size, not on the device. `guide` and
    `autoguidance`: autoguidance (samplers.guided_output); weight 1 leaves the guide out."""
    batches = []
    with tqdm(total=n, desc=desc, unit="img", mininterval=1.0) as bar:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            batch_labels = labels[start : start + count] if labels is not None else None
            images = sample(
                model, sampler, (count, 1, 28, 28), generator, batch_labels, guidance, device, autocast,
                guide=guide, autoguidance=autoguidance,
            )  # fmt: skip
            batches.append(to_uint8(images).cpu())
            bar.update(count)
    return torch.cat(batches)


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """Write `images` (uint8, N×1×28×28) as an .npz of `images` (N×28×28) and, if given, `labels` (int64)."""
    arrays: dict[str, Any] = {"images": images[:, 0].numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    write_atomic(path, lambda f: np.savez_compressed(f, **arrays))


def sweep_samples_path(samples_dir: Path, guidance: float) -> Path:
    """Where the guidance sweep's conditional samples at weight `guidance` live."""
    return Path(samples_dir) / "sweep" / f"guidance_{guidance:g}.npz"


def autoguidance_samples_path(samples_dir: Path, weight: float) -> Path:
    """Where the autoguidance sweep's unconditional samples at weight `weight` live."""
    return Path(samples_dir) / "sweep" / f"autoguidance_{weight:g}.npz"


def load_labelled_samples(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`load_samples` of a file that must hold labels (conditional samples)."""
    images, labels = load_samples(path)
    if labels is None:
        raise DataError(f"{path}: no labels in it; run the sample stage again")
    return images, labels


def load_samples(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read what `save_samples` wrote: images as uint8 N×1×28×28, and labels or None."""
    try:
        with np.load(path) as f:
            labels = torch.from_numpy(f["labels"]) if "labels" in f.files else None
            return torch.from_numpy(f["images"])[:, None], labels
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the sample stage first") from None
