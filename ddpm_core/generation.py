"""Drawing many images from a trained model: batches, balanced labels, a progress bar."""

from __future__ import annotations

import contextlib
import zipfile
import zlib
from collections.abc import Callable, Sequence
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
from ddpm_core.errors import CheckpointError, DataError, TrackingError
from ddpm_core.files import load_safe, load_state_checked, write_atomic
from ddpm_core.samplers import Sampler, make_sampler, sample
from ddpm_core.schedule import make_schedule
from ddpm_core.unet import UNet, build_unet

# The `sample` section of the project's params.yaml, for where none is at hand: weights
# from an MLflow run or registered model (`ddpm generate --run-id/--model`, the pyfunc).
DEFAULT_SAMPLE = {
    "sampler": "dpmpp2m", "steps": 10, "t_min": 10, "guidance": 2.0, "eta": 0.0,
    "autoguidance_uncond": 1.5, "autoguidance_cond": 2.0, "guidance_interval": None,
}  # fmt: skip


def load_unet(
    path: Path,
    params: ModelParams,
    conditional: bool,
    device: torch.device,
    source: str | None = None,
    remedy: str | None = None,
) -> UNet:
    """The EMA weights of a trained model, from a state_dict file, ready to sample. A file
    that is not the (un)conditional U-Net of `params` is a CheckpointError naming it (or
    `source`, where the weights came from) and `remedy`, by default retraining it with DVC."""
    kind = "cond" if conditional else "uncond"
    name = source or str(path)
    remedy = remedy or f"retrain it: `dvc repro --force -s train_{kind}`"
    state = load_safe(path, remedy=remedy)
    model = build_unet(params, NUM_CLASSES if conditional else None)
    differ = set(state) ^ set(model.state_dict()) if isinstance(state, dict) else None
    if differ == {"class_emb.weight"}:  # the other kind of the same U-Net: a mixed-up file
        has, wanted = (
            ("a conditional", "an unconditional") if not conditional else ("an unconditional", "a conditional")
        )
        raise CheckpointError(f"{name}: holds {has} model's weights where {wanted} one belongs; {remedy}")
    what = f"the {'conditional' if conditional else 'unconditional'} U-Net of model.* in params.yaml"
    load_state_checked(model, state, name, what, remedy)
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
    guidance_interval: Sequence[int] | None = None,
) -> torch.Tensor:
    """`n` uint8 images (n, 1, 28, 28), in batches; one generator feeds every batch, so
    the result depends on the seed and the batch size, not on the device. `guide` and
    `autoguidance`: autoguidance (samplers.guided_output); weight 1 leaves the guide out.
    `guidance_interval`: the timesteps CFG applies at (samplers.sample)."""
    batches = []
    with tqdm(total=n, desc=desc, unit="img", mininterval=1.0) as bar:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            batch_labels = labels[start : start + count] if labels is not None else None
            images = sample(
                model, sampler, (count, 1, 28, 28), generator, batch_labels, guidance, device, autocast,
                guide=guide, autoguidance=autoguidance, guidance_interval=guidance_interval,
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


RESAMPLE = "run `dvc repro --force -s sample`"


def load_labelled_samples(
    path: Path, count: int | None = None, remedy: str = RESAMPLE
) -> tuple[torch.Tensor, torch.Tensor]:
    """`load_samples` of a file that must hold labels (conditional samples)."""
    images, labels = load_samples(path, count, remedy)
    if labels is None:
        raise DataError(f"{path}: no labels in it; {remedy}")
    return images, labels


def load_samples(
    path: Path, count: int | None = None, remedy: str = RESAMPLE
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read what `save_samples` wrote: images as uint8 N×1×28×28, and labels or None.
    Anything else (not an .npz, truncated, other dtypes or sizes, labels that are not
    one class 0–9 per image, or not `count` images) is a DataError naming the file and
    ending in `remedy` (for the pipeline's own files: rerun the sample stage)."""
    path = Path(path)

    def refuse(why: str) -> DataError:
        return DataError(f"{path}: {why}; {remedy}")

    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise refuse("a single array, not an .npz of images and labels")
        with f:
            if "images" not in f.files:
                raise refuse(f"no 'images' array in it (it has {', '.join(f.files) or 'none'})")
            images = f["images"]
            labels = f["labels"] if "labels" in f.files else None
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {remedy.replace(' --force', '')}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "pickled" in first:  # numpy's guess for any file that is neither .npz nor .npy
            first = "not an .npz archive"
        raise refuse(f"not a readable .npz of samples ({first})") from None
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) == 0:
        raise refuse(f"images are {images.dtype} {'×'.join(map(str, images.shape))}, expected uint8 N×28×28")
    if count is not None and len(images) != count:
        raise refuse(f"{len(images)} images, where the params ask for {count}")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
            shape = "×".join(map(str, labels.shape))
            raise refuse(f"labels are {labels.dtype} {shape}, expected {len(images)} integers, one per image")
        if len(labels) and not (labels.min() >= 0 and labels.max() < NUM_CLASSES):
            raise refuse(f"labels run from {labels.min()} to {labels.max()}, expected classes 0 to {NUM_CLASSES - 1}")
    return torch.from_numpy(images)[:, None], None if labels is None else torch.from_numpy(labels.astype(np.int64))
