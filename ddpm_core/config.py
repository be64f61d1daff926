"""The typed schema of `params.yaml`, and loading it with errors that name the key.

Every knob of the pipeline is a field here. The schema is strict: a wrong type, an
out-of-range value, an unknown or a missing key is refused before any work starts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from ddpm_core.errors import ConfigError


class _Section(BaseModel):
    # strict: no bool for a number, no "3" for 3; allow_inf_nan=False: every float finite.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# Upper bounds: far beyond what any run of this project needs, short of what overflows a
# seed, exhausts memory in one batch or runs for months.
MAX_SEED = 2**32 - 1  # numpy's seeds; torch's generator takes them too
MAX_BATCH = 4096
MAX_GUIDANCE = 20.0
MAX_TIMESTEPS = 10_000
TRAINING_IMAGES = 60_000  # MNIST and Fashion-MNIST


def parse_guidance_interval(text: str) -> list[int] | None:
    """The text spelling of `sample.guidance_interval` (`ddpm generate --guidance-interval`,
    the logged model's `guidance_interval` param): `LO:HI` → [LO, HI], two timesteps with
    LO ≤ HI; `all` → None, guidance at every step. ValueError names what was given."""
    if text.strip() == "all":
        return None
    parts = text.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts) and int(parts[0]) <= int(parts[1]):
        return [int(parts[0]), int(parts[1])]
    raise ValueError(f"must be LO:HI, two timesteps with LO ≤ HI (e.g. 0:340), or all; got {text!r}")


class DataParams(_Section):
    dataset: Literal["mnist", "fashion-mnist"]
    train_subset: int | None = Field(ge=1, le=TRAINING_IMAGES)


class DiffusionParams(_Section):
    timesteps: int = Field(ge=2, le=MAX_TIMESTEPS)
    schedule: Literal["linear", "cosine"]
    prediction: Literal["eps", "v"]  # what the network outputs: the noise ε or v = α ε − σ x_0
    offset_noise: float = Field(ge=0.0, le=1.0)  # std of a per-image noise shift (diffusion.draw_noise)


class ModelParams(_Section):
    # One width per resolution level (28, 14, 7 pixels; 14, 7 at patch_size 2); GroupNorm uses 8 groups.
    channels: list[Annotated[int, Field(ge=8, le=1024, multiple_of=8)]] = Field(min_length=1, max_length=3)
    blocks_per_level: int = Field(ge=1, le=8)
    attention_heads: int = Field(ge=1, le=64)
    dropout: float = Field(ge=0.0, lt=1.0)
    patch_size: Literal[1, 2]  # 2: the U-Net runs at 14 pixels on 2×2 patches folded into channels

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelParams:
        if self.channels[-1] % self.attention_heads:
            raise ValueError(
                f"attention_heads ({self.attention_heads}) must divide the last width ({self.channels[-1]})"
            )
        size, levels = 28 // self.patch_size, 1  # 28 → 14 → 7 pixels; at patch_size 2, 14 → 7
        while size % 2 == 0:
            size, levels = size // 2, levels + 1
        if len(self.channels) > levels:
            raise ValueError(
                f"channels has {len(self.channels)} levels, but at patch_size {self.patch_size} the U-Net starts at "
                f"{28 // self.patch_size} pixels and halves to 7 at most: give at most {levels} widths"
            )
        return self


class TrainParams(_Section):
    batch_size: int = Field(ge=1, le=MAX_BATCH)
    lr: float = Field(gt=0.0, le=1.0)
    weight_decay: float = Field(ge=0.0, le=1.0)
    warmup_steps: int = Field(ge=0, le=10_000_000)
    grad_clip: float = Field(gt=0.0)
    ema_decay: float = Field(ge=0.0, lt=1.0)
    min_snr_gamma: float | None = Field(gt=0.0)
    precision: Literal["auto", "fp32", "bf16"]
    preview_steps: int = Field(ge=1)  # at most diffusion.timesteps (Params)
    preview_guidance: float = Field(ge=0.0, le=MAX_GUIDANCE)
    log_every: int = Field(ge=1)  # optimizer steps between points of the loss curves
    preview_every: int = Field(ge=1)  # optimizer steps between sample grids
    # Training processes (torch.distributed): each trains on its rows of every batch.
    processes: int = Field(ge=1, le=1024)
    # The guide of autoguidance: the EMA weights at this fraction of a model's training steps.
    guide_at: float = Field(gt=0.0, le=1.0)
    # Of the 2 × epochs passes over the data of both models, the conditional model's share.
    cond_share: float = Field(gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _a_row_for_every_process(self) -> TrainParams:
        if self.processes > self.batch_size:
            raise ValueError(
                f"train.processes ({self.processes}) must be at most train.batch_size ({self.batch_size}): "
                "each process trains on its share of every batch"
            )
        return self


class TrainCondParams(_Section):
    p_uncond: float = Field(ge=0.0, le=1.0)


class SampleParams(_Section):
    sampler: Literal["ddpm", "ddim", "dpmpp2m"]
    steps: int = Field(ge=1)  # at most diffusion.timesteps (Params)
    # The last timestep index visited (samplers.trailing_timesteps); None = T/steps − 1.
    t_min: int | None = Field(ge=0)
    guidance: float = Field(ge=0.0, le=MAX_GUIDANCE)
    # [lo, hi]: CFG only at the timesteps lo ≤ t ≤ hi (samplers.sample); None = every step.
    guidance_interval: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)] | None
    # Autoguidance weights (samplers.guided_output): 1 = the model alone, 0 = its guide alone.
    autoguidance_uncond: float = Field(ge=0.0, le=MAX_GUIDANCE)
    autoguidance_cond: float = Field(ge=0.0, le=MAX_GUIDANCE)
    eta: float = Field(ge=0.0, le=1.0)  # DDIM's noise: 0 deterministic, 1 the DDPM posterior's
    batch_size: int = Field(ge=1, le=10_000)


class EvaluateParams(_Section):
    num_samples: int = Field(ge=10, le=60_000)
    # Conditional accuracy and FID at each guidance weight, on sweep_samples images each.
    guidance_sweep: list[Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE)]] = Field(max_length=20)
    sweep_samples: int = Field(ge=10, le=60_000)
    # FID and class spread of the unconditional model at each autoguidance weight, as many images each.
    autoguidance_sweep: list[Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE)]] = Field(max_length=20)
    # Classification Accuracy Score: the first cas_samples conditional samples train a
    # classifier for cas_epochs; 0 skips it.
    cas_samples: int = Field(ge=0, le=60_000)
    cas_epochs: int = Field(ge=1, le=1000)
    # The first test_subset test images are the judges' reference (FID, KID, precision and
    # recall) and CAS's test set; None = all 10,000.
    test_subset: int | None = Field(ge=100, le=10_000)

    @model_validator(mode="after")
    def _distinct_weights(self) -> EvaluateParams:
        for key, weights in (("guidance_sweep", self.guidance_sweep), ("autoguidance_sweep", self.autoguidance_sweep)):
            if len(set(weights)) != len(weights):
                raise ValueError(f"{key} lists a weight twice: {weights}")
        return self

    @model_validator(mode="after")
    def _cas_samples_are_drawn(self) -> EvaluateParams:
        if self.cas_samples > self.num_samples:
            raise ValueError(
                f"cas_samples ({self.cas_samples}) must be at most num_samples ({self.num_samples}): "
                "the CAS classifier trains on the conditional samples the stage judges; raise num_samples too"
            )
        if 0 < self.cas_samples < 10:
            raise ValueError(f"cas_samples ({self.cas_samples}) must be 0 (no CAS) or at least 10, one per class")
        return self


class EvaluatorParams(_Section):
    """The MNIST classifier that judges samples; its own seed keeps it fixed across experiments."""

    seed: int = Field(ge=0, le=MAX_SEED)
    train_subset: int | None = Field(ge=1, le=TRAINING_IMAGES)
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=1, le=MAX_BATCH)
    lr: float = Field(gt=0.0, le=1.0)


class Params(_Section):
    seed: int = Field(ge=0, le=MAX_SEED)
    epochs: int = Field(ge=1, le=10_000)
    data: DataParams
    diffusion: DiffusionParams
    model: ModelParams
    train: TrainParams
    train_cond: TrainCondParams
    sample: SampleParams
    evaluate: EvaluateParams
    evaluator: EvaluatorParams
    evaluator_alt: EvaluatorParams  # the second judge (evaluation.ResidualClassifier), built apart

    @model_validator(mode="after")
    def _steps_within_the_schedule(self) -> Params:
        timesteps = self.diffusion.timesteps
        for key, steps in (("sample.steps", self.sample.steps), ("train.preview_steps", self.train.preview_steps)):
            if steps > timesteps:
                raise ValueError(
                    f"{key} ({steps}) must be at most diffusion.timesteps ({timesteps}): a sampler visits each "
                    "timestep at most once"
                )
        if self.sample.t_min is not None and self.sample.t_min >= timesteps:
            raise ValueError(f"sample.t_min ({self.sample.t_min}) must be below diffusion.timesteps ({timesteps})")
        return self

    @model_validator(mode="after")
    def _guidance_interval_holds_a_step(self) -> Params:
        # An interval between the sampler's steps would silently turn CFG off: refuse it.
        sp, timesteps = self.sample, self.diffusion.timesteps
        if sp.guidance_interval is None:
            return self
        lo, hi = sp.guidance_interval
        if lo > hi or hi >= timesteps:
            raise ValueError(
                f"sample.guidance_interval [{lo}, {hi}] must be [lo, hi] with lo ≤ hi < diffusion.timesteps ({timesteps})"
            )
        if sp.sampler == "ddpm":
            return self  # DDPM visits every timestep
        from ddpm_core.samplers import guided_timesteps, trailing_timesteps  # torch: only when an interval is set

        visited = trailing_timesteps(timesteps, sp.steps, sp.t_min if sp.steps > 1 else None).tolist()
        if not guided_timesteps(visited, (lo, hi)):
            raise ValueError(
                f"sample.guidance_interval [{lo}, {hi}] holds none of the {sp.steps} steps' timesteps "
                f"({', '.join(map(str, visited))}): CFG would never apply; widen it or set it to null"
            )
        return self

    @model_validator(mode="after")
    def _last_timestep_fits(self) -> Params:
        # `steps` distinct timesteps from T − 1 down to t_min need t_min ≤ T − steps.
        sp, timesteps = self.sample, self.diffusion.timesteps
        if sp.sampler != "ddpm" and sp.t_min is not None and sp.steps > 1 and sp.t_min > timesteps - sp.steps:
            raise ValueError(
                f"sample.t_min ({sp.t_min}) must be at most diffusion.timesteps − sample.steps "
                f"({timesteps} − {sp.steps} = {timesteps - sp.steps}), so that each step visits its own timestep"
            )
        return self


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(error: ErrorDetails, source: str) -> str:
    loc = tuple(p for p in error["loc"] if isinstance(p, str))
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        known = _known_keys(Params, loc[:-1])
        near = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean '{'.'.join((*loc[:-1], near[0]))}'?)" if near else ""
        allowed = ", ".join(known)
        return f"{source}: unknown key '{key}'{hint}; allowed here: {allowed}"
    if error["type"] == "missing":
        return f"{source}: missing key '{key}'"
    if error["type"] == "value_error":
        where = f"{key}: " if key else ""  # a check across sections names its keys itself
        return f"{source}: {where}{error['msg'].removeprefix('Value error, ')}"
    return f"{source}: {key} = {error.get('input')!r}: {error['msg']}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a mapping (as read from YAML) into `Params`, or raise one `ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # typos first
        lines = [_describe(e, source) for e in errors]
        raise ConfigError("\n".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_params(raw, str(path))


def flatten(values: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """`{'train': {'lr': 0.002}}` → `{'train.lr': 0.002}`: the dotted keys of DVC and MLflow."""
    if isinstance(values, BaseModel):
        values = values.model_dump()
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
