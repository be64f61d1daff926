"""The pyfunc flavour of a logged model: `DigitSampler`, the code MLflow saves with each
model to build it (PYFUNC_CODE, "models from code": no pickle), its signature and the
packages it needs where it is loaded."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec


def _interval_text(interval: object) -> str:
    """sample.guidance_interval in the spelling of `ddpm generate`: `LO:HI`, or `all`."""
    return "all" if interval is None else ":".join(str(t) for t in cast("list[int]", interval))


def _signature(kind: str) -> ModelSignature:
    """Input: one row per image (column `label`, the class, for the conditional model; any
    column for the unconditional one); params: the sampler's; output: uint8 (N, 28, 28)."""
    from ddpm_core.generation import DEFAULT_SAMPLE

    columns: list[ColSpec | TensorSpec] = (
        [ColSpec("long", "label")] if kind == "cond" else [ColSpec("long", "index", required=False)]
    )
    params = ParamSchema([
        ParamSpec("seed", "long", 0), ParamSpec("sampler", "string", DEFAULT_SAMPLE["sampler"]),
        ParamSpec("steps", "long", DEFAULT_SAMPLE["steps"]), ParamSpec("guidance", "double", DEFAULT_SAMPLE["guidance"]),
        ParamSpec("autoguidance", "double", float(cast(float, DEFAULT_SAMPLE[f"autoguidance_{kind}"]))),
        ParamSpec("guidance_interval", "string", _interval_text(DEFAULT_SAMPLE["guidance_interval"])),
    ])  # fmt: skip
    return ModelSignature(
        inputs=Schema(columns), outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]), params=params
    )


def _requirements() -> list[str]:
    """What loading the pyfunc elsewhere needs: this project (ddpm_core) and its pins."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "torchvision", "numpy", "pandas", "pyyaml", "pydantic", "mlflow"):
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{package}=={version(package)}")
    return pins


class DigitSampler(PythonModel):
    """The pyfunc flavour of a trained model: `mlflow.pyfunc.load_model(uri).predict(df)`
    draws one image per row of `df` (the conditional model reads the class from its
    `label` column), with params seed, sampler, steps, guidance, autoguidance and
    guidance_interval (`LO:HI`: CFG only at the steps with LO ≤ t ≤ HI, as
    sample.guidance_interval; `all`: every step), and returns them as uint8 (N, 28, 28).
    The same input and params give the same bytes.
    A model logged with a guide samples with autoguidance at the weight `autoguidance`
    (default: DEFAULT_SAMPLE's for its kind); one logged without samples as before, the
    weight unused. Needs ddpm_core importable (this project installed) where it is loaded."""

    def load_context(self, context: PythonModelContext) -> None:
        from ddpm_core import envvars, hardware
        from ddpm_core.generation import load_unet, params_from_logged

        envvars.check_environment()
        spec = json.loads(Path(context.artifacts["params"]).read_text())
        self.kind = spec["kind"]
        model_params, self.diffusion, self.dataset = params_from_logged(spec["params"], "this model")
        self.device = hardware.pick_device()
        conditional = self.kind == "cond"
        self.model = load_unet(Path(context.artifacts["weights"]), model_params, conditional, self.device)
        guide = context.artifacts.get("guide")  # none in models logged before guides were
        self.guide = load_unet(Path(guide), model_params, conditional, self.device) if guide else None

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        import torch

        from ddpm_core import hardware
        from ddpm_core.config import parse_guidance_interval
        from ddpm_core.data import NUM_CLASSES
        from ddpm_core.generation import DEFAULT_SAMPLE, generate, sampler_for
        from ddpm_core.samplers import guided_timesteps

        p = {**DEFAULT_SAMPLE, **(params or {})}
        labels = None
        if self.kind == "cond":
            labels = torch.tensor(np.asarray(model_input["label"], dtype=np.int64))
            if labels.numel() and not bool(((labels >= 0) & (labels < NUM_CLASSES)).all()):
                raise ValueError(f"label must be a class 0..{NUM_CLASSES - 1}; got {sorted(set(labels.tolist()))}")
        given = (params or {}).get("autoguidance")
        autoguidance = float(cast(float, DEFAULT_SAMPLE[f"autoguidance_{self.kind}"] if given is None else given))
        if not (math.isfinite(autoguidance) and autoguidance >= 0):
            raise ValueError(f"autoguidance must be a finite weight, 0 or more; got {given}")
        sampler = sampler_for(self.diffusion, p, int(p["steps"]))
        given_interval = (params or {}).get("guidance_interval")
        try:
            interval = (
                cast("list[int] | None", DEFAULT_SAMPLE["guidance_interval"])
                if given_interval is None
                else parse_guidance_interval(str(given_interval))
            )
        except ValueError as error:
            raise ValueError(f"guidance_interval {error}") from None
        visited = sampler.timesteps.tolist()
        if labels is not None and interval is not None and not guided_timesteps(visited, interval):
            raise ValueError(
                f"guidance_interval {_interval_text(interval)} holds none of the sampler's timesteps "
                f"({', '.join(map(str, visited[:12]))}{', …' if len(visited) > 12 else ''}): guidance would never apply; "
                "widen it, or give all"
            )
        generator = torch.Generator().manual_seed(int(p["seed"]))
        guidance = float(p["guidance"]) if labels is not None else 1.0
        autocast = hardware.sampling_autocast(self.device)
        images = generate(
            self.model,
            sampler,
            len(model_input),
            generator,
            labels,
            guidance,
            128,
            self.device,
            autocast,
            desc="pyfunc",
            guide=self.guide,
            autoguidance=autoguidance,
            guidance_interval=interval if labels is not None else None,
        )
        return images[:, 0].numpy()


# The pyfunc's code, saved with each logged model (MLflow's "models from code"). Models
# logged already hold this import: ddpm_core.tracking keeps exporting DigitSampler.
PYFUNC_CODE = """\
import mlflow
from ddpm_core.tracking import DigitSampler

mlflow.models.set_model(DigitSampler())
"""
