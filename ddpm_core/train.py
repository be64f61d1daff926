"""The training loop shared by the unconditional and the class-conditional model.

AdamW with a linear warm-up and cosine decay, gradient clipping, EMA of the weights,
autocast where it pays, a checkpoint after every epoch (from which an interrupted run
resumes). Every `train.log_every` optimizer steps the tracker gets the loss, lr, gradient
norm, images/s and the ε-loss by noise level; every `train.preview_every` steps (and at
the end) a fixed-noise sample grid from the EMA model.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from ddpm_core import hardware
from ddpm_core.config import Params, TrainParams
from ddpm_core.data import NUM_CLASSES, ImageSet, to_model_range
from ddpm_core.diffusion import LossTerms, diffusion_loss_terms
from ddpm_core.distributed import World, wrap
from ddpm_core.ema import make_ema
from ddpm_core.errors import TrainingError
from ddpm_core.files import load_safe, save_atomic
from ddpm_core.progress import RunPlan, RunProgress
from ddpm_core.samplers import make_sampler, sample
from ddpm_core.schedule import NoiseSchedule, make_schedule
from ddpm_core.seeding import restore_rng_state, rng_state, seed_everything
from ddpm_core.unet import build_unet
from ddpm_core.viz import image_grid

PREVIEW_PER_CLASS = 8  # conditional grid: one row per class, this many columns
PREVIEW_UNCOND = 64  # unconditional grid: 8 × 8
PROGRESS_EVERY = 20  # steps between progress-bar updates (and divergence checks)
NOISE_BUCKETS = 5  # the ε-loss by noise level: the T timesteps in this many equal ranges
CURVE_COLUMNS = ("step", "epoch", "loss")  # reports/loss_<kind>.csv


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: np.ndarray, key: str, step: int) -> None: ...


@dataclass
class TrainResult:
    ema_state_dict: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)  # mean training loss of each epoch
    curve: list[dict[str, float]] = field(default_factory=list)  # one row per log point (step, epoch, loss, ...)
    images_per_s: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    # the EMA weights at the steps asked for (the guide's, by default), by global step
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    precision: str = "fp32"
    device: str = "cpu"
    resumed_after_epoch: int = 0  # 0: trained from scratch


@dataclass
class Optimization:
    """Everything the optimisation updates besides the data order: the network, its EMA,
    AdamW, the LR schedule and the fp16 loss scaler. Checkpointed as one dict. `net` is
    what the forward pass runs: the network itself, or it inside DistributedDataParallel."""

    model: torch.nn.Module
    ema: torch.optim.swa_utils.AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    grad_clip: float
    net: torch.nn.Module | None = None

    @classmethod
    def build(
        cls, model: torch.nn.Module, tp: TrainParams, total_steps: int, precision: str, device: torch.device
    ) -> Optimization:
        optimizer = torch.optim.AdamW(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
        return cls(
            model=model,
            ema=make_ema(model, tp.ema_decay),
            optimizer=optimizer,
            scheduler=LambdaLR(optimizer, lambda step: warmup_cosine(step, tp.warmup_steps, total_steps)),
            scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
            grad_clip=tp.grad_clip,
        )

    _PARTS = ("model", "ema", "optimizer", "scheduler", "scaler")

    def state_dict(self) -> dict:
        return {key: getattr(self, key).state_dict() for key in self._PARTS}

    def load_state_dict(self, state: dict) -> None:
        for key in self._PARTS:
            getattr(self, key).load_state_dict(state[key])


@dataclass(frozen=True)
class Objective:
    """What the loss trains: the prediction target (ε or v), its Min-SNR weighting, and the
    noise it is trained against (`diffusion.offset_noise`)."""

    prediction: str
    min_snr_gamma: float | None
    offset_noise: float

    @classmethod
    def of(cls, params: Params) -> Objective:
        return cls(params.diffusion.prediction, params.train.min_snr_gamma, params.diffusion.offset_noise)


@dataclass
class StepStats:
    """What one optimisation step reports, left on the device (no host sync)."""

    terms: LossTerms
    grad_norm: torch.Tensor  # before clipping


def train_step(
    opt: Optimization,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
    autocast: Callable[[], AbstractContextManager],
    objective: Objective,
    global_batch: int | None = None,
    rows: slice = slice(None),
    loss_scale: float = 1.0,
) -> StepStats:
    """One optimisation step on a batch; returns its loss terms and gradient norm.

    `objective` (from `Objective.of(params)`) is required so that no caller (the
    benchmark, say) trains a different objective from the pipeline's by leaving it out.
    Under torch.distributed `x0` and `labels` are this process's `rows` of a batch of
    `global_batch`, and `loss_scale` = rows × processes / global_batch, so that DDP's mean
    of the gradients over the processes is the gradient of the global batch's mean loss."""
    with autocast():
        terms = diffusion_loss_terms(
            opt.net or opt.model,
            schedule,
            x0,
            labels,
            generator,
            objective.prediction,
            objective.min_snr_gamma,
            objective.offset_noise,
            global_batch,
            rows,
        )
    opt.optimizer.zero_grad(set_to_none=True)
    loss = terms.loss if loss_scale == 1.0 else terms.loss * loss_scale
    opt.scaler.scale(loss).backward()
    opt.scaler.unscale_(opt.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(opt.model.parameters(), opt.grad_clip)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    opt.ema.update_parameters(opt.model)
    return StepStats(LossTerms(terms.loss.detach(), terms.index, terms.eps_mse), grad_norm.detach())


class CurveMeter:
    """Sums over the steps since the last log point, kept on the device until `take`."""

    def __init__(self, timesteps: int, device: torch.device):
        self.width = math.ceil(timesteps / NOISE_BUCKETS)
        digits = len(str(timesteps - 1))
        self.names = [
            f"eps_loss/t{lo:0{digits}d}-{min(lo + self.width, timesteps) - 1:0{digits}d}"
            for lo in range(0, timesteps, self.width)
        ]
        self.device = device
        self.taken_images = 0.0
        self._reset()

    def _reset(self) -> None:
        zeros = lambda *shape: torch.zeros(shape, device=self.device)  # float32: MPS has no float64  # noqa: E731
        self.loss, self.images, self.grad, self.steps = zeros(), zeros(), zeros(), 0
        self.bucket_sum, self.bucket_count = zeros(len(self.names)), zeros(len(self.names))

    def add(self, stats: StepStats) -> None:
        n = stats.terms.index.numel()
        self.loss += stats.terms.loss.float() * n
        self.images += n
        self.grad += stats.grad_norm.float()
        self.steps += 1
        bucket = stats.terms.index // self.width
        self.bucket_sum += torch.bincount(bucket, weights=stats.terms.eps_mse.float(), minlength=len(self.names))
        self.bucket_count += torch.bincount(bucket, minlength=len(self.names)).float()

    def take(self, world: World | None = None) -> dict[str, float]:
        """The means since the last call (one host sync), over all processes of `world`,
        then start again. A noise-level range no sample fell into is left out."""
        if world is not None and world.size > 1:
            totals = world.sum(
                torch.cat([torch.stack([self.loss, self.images, self.grad]), self.bucket_sum, self.bucket_count])
            )
            self.loss, self.images, self.grad = totals[0], totals[1], totals[2] / world.size
            k = len(self.names)
            self.bucket_sum, self.bucket_count = totals[3 : 3 + k], totals[3 + k :]
        self.taken_images = float(self.images.item())  # of all processes: for images/s
        values = {"loss": (self.loss / self.images).item(), "grad_norm": (self.grad / max(1, self.steps)).item()}
        sums, counts = self.bucket_sum.tolist(), self.bucket_count.tolist()
        values.update(
            {name: total / count for name, total, count in zip(self.names, sums, counts, strict=True) if count > 0}
        )
        self._reset()
        return values


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def run_fingerprint(params: Params, conditional: bool) -> str:
    """What a resumable checkpoint must agree on: everything that shapes the run."""
    relevant = {
        "conditional": conditional,
        "seed": params.seed,
        "epochs": params.epochs,
        "data": params.data.model_dump(),
        "diffusion": params.diffusion.model_dump(),
        "model": params.model.model_dump(),
        "train": params.train.model_dump(),
        "train_cond": params.train_cond.model_dump() if conditional else None,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def preview_grid(
    ema_model: torch.nn.Module,
    params: Params,
    conditional: bool,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> np.ndarray:
    """A fixed-noise sample grid: the same seed every epoch, so grids show progress."""
    schedule = make_schedule(params.diffusion.schedule, params.diffusion.timesteps)
    sampler = make_sampler(
        "ddim",
        schedule,
        params.train.preview_steps,
        0.0,
        params.diffusion.prediction,
        offset_noise=params.diffusion.offset_noise,
    )
    generator = torch.Generator().manual_seed(params.seed)
    if conditional:
        labels = torch.arange(NUM_CLASSES).repeat_interleave(PREVIEW_PER_CLASS)
        images = sample(
            ema_model,
            sampler,
            (len(labels), 1, 28, 28),
            generator,
            labels,
            params.train.preview_guidance,
            device,
            autocast,
        )
        return image_grid(images, nrow=PREVIEW_PER_CLASS)
    images = sample(ema_model, sampler, (PREVIEW_UNCOND, 1, 28, 28), generator, device=device, autocast=autocast)
    return image_grid(images, nrow=int(math.sqrt(PREVIEW_UNCOND)))


@dataclass(frozen=True)
class TrainingPlan:
    """How many optimizer steps a model trains and where they fall.

    A model trains `model_epochs(params, conditional)` passes over the data (the default
    split gives each model `epochs`); the last pass may be partial. The guide is the EMA
    at step `guide_step` = `train.guide_at` × the steps, at least one step in."""

    steps_per_epoch: int
    total_steps: int
    guide_step: int

    @classmethod
    def of(cls, images: int, params: Params, conditional: bool) -> TrainingPlan:
        steps_per_epoch = math.ceil(images / params.train.batch_size)
        total = max(1, round(model_epochs(params, conditional) * steps_per_epoch))
        return cls(steps_per_epoch, total, min(total, max(1, round(params.train.guide_at * total))))

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch)


def model_epochs(params: Params, conditional: bool) -> float:
    """The passes over the data one model gets: of the 2 × `epochs` passes of both models,
    the conditional one gets the share `train.cond_share`, the unconditional one the rest."""
    share = params.train.cond_share if conditional else 1 - params.train.cond_share
    return 2 * params.epochs * share


def _resume(
    resume_path: Path,
    fingerprint: str,
    opt: Optimization,
    generator: torch.Generator,
    result: TrainResult,
    tracker: Tracker | None,
    world: World,
    name: str,
) -> int:
    """Load the state an interrupted run saved (same params only), replay its curve to
    `tracker`, and return the epoch to start from (1 without one)."""
    if not resume_path.exists():
        return 1
    state = load_safe(resume_path)
    if state.get("fingerprint") != fingerprint:
        return 1
    opt.load_state_dict(state["optimization"])
    restore_rng_state(state["rng"], generator)
    result.losses, result.images_per_s = state["losses"], state["images_per_s"]
    result.epoch_seconds, result.curve = state["epoch_seconds"], state["curve"]
    result.snapshots = state["snapshots"]
    result.resumed_after_epoch = state["epoch"]
    if world.is_main:
        print(f"{name}: resuming after epoch {state['epoch']} from {resume_path}", flush=True)
    if tracker is not None:
        for row in result.curve:
            tracker.log_metrics({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=int(row["step"]))
        for epoch, (epoch_loss, rate, seconds) in enumerate(
            zip(result.losses, result.images_per_s, result.epoch_seconds, strict=True), start=1
        ):
            tracker.log_metrics(
                {"epoch_loss": epoch_loss, "epoch_images_per_s": rate, "epoch_seconds": seconds}, step=epoch
            )
    return state["epoch"] + 1


def _checkpoint(
    resume_path: Path, fingerprint: str, epoch: int, opt: Optimization, generator: torch.Generator, result: TrainResult
) -> None:
    """Everything `_resume` needs to continue after `epoch` as if never stopped."""
    save_atomic(
        {
            "fingerprint": fingerprint,
            "epoch": epoch,
            "optimization": opt.state_dict(),
            "rng": rng_state(generator),
            "losses": result.losses,
            "images_per_s": result.images_per_s,
            "epoch_seconds": result.epoch_seconds,
            "curve": result.curve,
            "snapshots": result.snapshots,
        },
        resume_path,
    )


def _ema_copy(opt: Optimization) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in opt.ema.module.state_dict().items()}


@dataclass
class _Loop:
    """What the steps of every epoch share: the run's fixed parts and its plan."""

    data: ImageSet
    params: Params
    conditional: bool
    plan: TrainingPlan
    opt: Optimization
    schedule: NoiseSchedule
    objective: Objective
    generator: torch.Generator
    autocast: Callable[[], AbstractContextManager]
    device: torch.device
    world: World
    tracker: Tracker | None
    name: str
    result: TrainResult
    snapshot_steps: frozenset[int]
    resume_path: Path
    run_progress: RunProgress | None = None  # the run-wide line above the epoch's

    def epoch(self, epoch: int) -> None:
        """Train one (possibly partial) pass over the data; log, preview, snapshot."""
        tp, plan, world, result = self.params.train, self.plan, self.world, self.result
        self.opt.model.train()
        live = self.run_progress is not None and self.run_progress.live
        order = torch.randperm(len(self.data), generator=self.generator)
        loss_sum = torch.zeros((), device=self.device)
        steps, seen = plan.steps_in(epoch), 0
        meter = CurveMeter(self.schedule.timesteps, self.device)
        started = interval_started = time.perf_counter()
        preview_seconds = 0.0  # not training time: left out of images/s and epoch_seconds
        bar = tqdm(
            range(steps),
            desc=f"{self.name} epoch {epoch}/{plan.epochs}",
            unit="step",
            mininterval=1.0,
            dynamic_ncols=True,
            disable=not world.is_main,
            # under the run-wide line, which keeps the whole run; the epoch's own line goes
            # (its summary is printed once the epoch is saved)
            position=1 if live else None,
            leave=not live,
        )
        shown = 0  # steps of this epoch counted on the run-wide line
        for step in bar:
            global_step = (epoch - 1) * plan.steps_per_epoch + step + 1
            idx = order[step * tp.batch_size : (step + 1) * tp.batch_size]
            rows = world.rows(len(idx))  # all of them in a single process
            x0 = to_model_range(self.data.images[idx[rows]]).to(self.device)
            y = None
            if self.conditional:
                drop = torch.rand(len(idx), generator=self.generator) < self.params.train_cond.p_uncond
                y = self.data.labels[idx].masked_fill(drop, NUM_CLASSES)[rows].to(self.device)  # NUM_CLASSES: ∅
            share = x0.shape[0] * world.size / len(idx)  # 1 in a single process
            distributed = world.size > 1
            stats = train_step(
                self.opt, self.schedule, x0, y, self.generator, self.autocast, self.objective,
                len(idx) if distributed else None, rows, share,
            )  # fmt: skip
            seen += len(idx)
            loss_sum += stats.terms.loss * x0.shape[0]
            meter.add(stats)
            if global_step in self.snapshot_steps:
                result.snapshots[global_step] = _ema_copy(self.opt)
            if step % PROGRESS_EVERY == 0 or step == steps - 1:
                # The host sync of the step loop: progress, and a check for divergence.
                self._check_finite(loss_sum, epoch, step)
                rate = seen / (time.perf_counter() - started - preview_seconds)
                bar.set_postfix(loss=f"{stats.terms.loss.item():.4f}", img_s=f"{rate:.0f}")
                if self.run_progress is not None:
                    self.run_progress.advance(step + 1 - shown)
                    shown = step + 1
            if global_step % tp.log_every == 0 or step == steps - 1:
                # Also at each epoch's end, so that a run resumed from an epoch's checkpoint
                # logs the very points of an uninterrupted one.
                now = time.perf_counter()
                point = meter.take(world)
                point["lr"] = float(self.opt.scheduler.get_last_lr()[0])
                point["images_per_s"] = meter.taken_images / max(now - interval_started, 1e-9)
                result.curve.append({"step": global_step, "epoch": epoch, **point})
                if self.tracker is not None:
                    self.tracker.log_metrics(point, step=global_step)
                interval_started = now
            if self.tracker is not None and (global_step % tp.preview_every == 0 or global_step == plan.total_steps):
                spent = self._preview(global_step)
                preview_seconds += spent
                interval_started += spent
        bar.close()

        seconds = time.perf_counter() - started - preview_seconds
        mean_loss = world.sum(loss_sum).item() / seen
        result.losses.append(mean_loss)
        result.images_per_s.append(seen / seconds)
        result.epoch_seconds.append(seconds)
        if self.tracker is not None:
            self.tracker.log_metrics(
                {"epoch_loss": mean_loss, "epoch_images_per_s": seen / seconds, "epoch_seconds": seconds}, step=epoch
            )

    def _check_finite(self, loss_sum: torch.Tensor, epoch: int, step: int) -> None:
        if not math.isfinite(self.world.sum(loss_sum.clone()).item()):
            last = f"{self.resume_path} (epoch {epoch - 1})" if epoch > 1 else "none (first epoch)"
            raise TrainingError(
                f"{self.name}: loss became {loss_sum.item()} in epoch {epoch} by step {step + 1}; "
                f"try a lower train.lr; last good checkpoint: {last}"
            )

    def _preview(self, global_step: int) -> float:
        """Log the fixed-noise grid of the EMA model; return the seconds it took."""
        assert self.tracker is not None
        started = time.perf_counter()
        self.opt.ema.module.eval()
        grid = preview_grid(self.opt.ema.module, self.params, self.conditional, self.device, self.autocast)
        self.tracker.log_image(grid, key="samples", step=global_step)
        return time.perf_counter() - started


def train_diffusion(
    data: ImageSet,
    params: Params,
    conditional: bool,
    resume_path: Path,
    tracker: Tracker | None = None,
    name: str = "train",
    device: torch.device | None = None,
    world: World | None = None,
    snapshot_steps: tuple[int, ...] | None = None,
    run_plan: RunPlan | None = None,
) -> TrainResult:
    """Train the network on `data` for its share of `params.epochs` (`TrainingPlan`) and
    return the EMA weights, with the EMA weights at each of `snapshot_steps` (default: the
    guide's step, `TrainingPlan.guide_step`) in `TrainResult.snapshots`.

    Every `train.log_every` optimizer steps and at each epoch's end, `tracker` gets the loss, lr, gradient norm,
    images/s and the ε-loss in NOISE_BUCKETS timestep ranges at step = the global
    optimizer step, and the same point joins `TrainResult.curve`; every
    `train.preview_every` steps and at the last one, a fixed-noise sample grid; after each
    epoch, its mean loss (`epoch_loss`), images/s and seconds at step = the epoch.

    After every epoch the full state (model, EMA, optimizer, LR schedule, RNG states,
    the curve and snapshots so far) goes to `resume_path`; a later call with the same
    params continues from there, logs the saved curve to its tracker again (so its run has
    the whole of it), and ends with the same bytes as an uninterrupted run.

    In a `world` of several processes (torch.distributed, process group joined) each
    trains on its rows of every batch; all get the same weights back, only rank 0 saves
    checkpoints and shows progress, and a `tracker` belongs on rank 0 alone.

    With a `run_plan` (the trainings of this pipeline execution, this one among them), a
    run-wide progress line with the time left for all of them sits above the epoch's.
    """
    world = world or World()
    device = device or hardware.pick_device()
    generator = seed_everything(params.seed)
    precision = hardware.resolve_precision(params.train.precision, device)
    plan = TrainingPlan.of(len(data), params, conditional)
    model = hardware.place_model(build_unet(params.model, NUM_CLASSES if conditional else None), device, precision)
    opt = Optimization.build(model, params.train, plan.total_steps, precision, device)
    opt.net = wrap(model, world, device)
    fingerprint = run_fingerprint(params, conditional)
    result = TrainResult(ema_state_dict={}, precision=precision, device=str(device))
    start_epoch = _resume(resume_path, fingerprint, opt, generator, result, tracker, world, name)
    run_progress = None
    if run_plan is not None:
        done = min(plan.total_steps, (start_epoch - 1) * plan.steps_per_epoch)
        run_progress = RunProgress(run_plan, done_in_stage=done, live=world.is_main and sys.stderr.isatty())
    loop = _Loop(
        data, params, conditional, plan, opt, make_schedule(params.diffusion.schedule, params.diffusion.timesteps),
        Objective.of(params), generator, hardware.autocast_factory(precision, device), device, world, tracker, name,
        result, frozenset((plan.guide_step,) if snapshot_steps is None else snapshot_steps), resume_path,
        run_progress,
    )  # fmt: skip
    try:
        for epoch in range(start_epoch, plan.epochs + 1):
            loop.epoch(epoch)
            if not world.is_main:
                continue
            _checkpoint(resume_path, fingerprint, epoch, opt, generator, result)
            # Printed once the epoch is saved: from here on, an interruption resumes after it.
            rate, seconds = result.images_per_s[-1], result.epoch_seconds[-1]
            line = f"{name} epoch {epoch}: loss {result.losses[-1]:.4f}, {rate:.0f} images/s, {seconds:.0f} s"
            tqdm.write(line if run_progress is None else f"{line}; {run_progress.summary()}")
            sys.stdout.flush()
    finally:
        if run_progress is not None:
            run_progress.close()
    result.ema_state_dict = _ema_copy(opt)
    return result
