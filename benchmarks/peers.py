"""Against the recipe a user would pick instead: quality per CPU-minute, side by side, in one run.

    make peers                                          # installs the bench extra, then the line below
    python benchmarks/peers.py                          # budgets 1 and 3, 1,000 samples a row
    python benchmarks/peers.py --budgets 1 --models uncond --recipes ddpm_core diffusers-small
    python benchmarks/peers.py --tiny --out /tmp/peers.csv   # seconds: every code path, meaningless numbers

For each budget and each model (unconditional, class-conditional), in this order:

1. ddpm_core: this project's default recipe, trained by the pipeline's own entry point
   (ddpm_core.train.train_diffusion, as stages/train.py calls it) with params.yaml and its
   `key=value` overrides. Its measured training seconds (the sum of the epochs' seconds, as
   reports/train_<kind>.json's `train_seconds`) ARE the budget: budget 1 is the default run
   (`epochs: 1`, one pass over MNIST a model); budget B is `epochs` × B, i.e. what
   `dvc exp run -S epochs=3` trains, with its warm-up, cosine decay, EMA and autoguidance
   guide (the EMA at `train.guide_at` of the steps) stretched over the longer run. That is
   the honest 3×: the recipe a user gets by asking for 3× the training, not the 1× run with
   its schedule cut; its minutes are measured, not assumed, so the diffusers recipes get
   exactly the minutes it took. Sampled as the sample stage samples (ddpm_core.generation:
   `sample.sampler` at `sample.steps` and `sample.t_min`, CFG `sample.guidance` for the
   conditional model, autoguidance by the guide at `sample.autoguidance_uncond` /
   `sample.autoguidance_cond`, `sample.batch_size`).

2. diffusers' recipe: UNet2DModel + DDPMScheduler (ε prediction, linear β 1e-4 → 0.02,
   1,000 steps) with the defaults of diffusers' examples/unconditional_image_generation/
   train_unconditional.py: AdamW lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, eps 1e-8;
   warm-up over 500 steps then cosine decay to 0 (diffusers.optimization); gradient norm
   clipped at 1; plain MSE on ε; EMA by diffusers.training_utils.EMAModel with the example's
   warm-up (decay 1 − (1 + step/inv_gamma)^−power, inv_gamma 1, power 3/4, at most 0.9999);
   the example's batch size, 16 (--theirs-batch-size; ours is 32); no augmentation (the
   example's optional horizontal flip would turn digits into non-digits; its resize and crop
   are the identity at 28 pixels; its normalisation to [−1, 1] is ours). Two sizes:
     diffusers-small    block_out_channels (32, 64, 64), 2 ResNet layers per block, attention
                        at 14 and 7 pixels, diffusers' defaults otherwise (32 groups, head
                        dim 8): the U-Net of the MNIST notebooks of Hugging Face's diffusion
                        course (units 1 and 2), what a user starting from diffusers' docs
                        would build for 28×28 digits;
     diffusers-matched  the widths of params.yaml's `model` (32, 64, 128), its blocks per
                        level, attention at the lowest resolution with its heads, 8 groups:
                        the UNet2DModel of benchmarks/benchmark.py's speed comparison.
   The conditional models take `num_class_embeds` = 11 (ten digits and a null class) and are
   trained with the same label dropout as ours (`train_cond.p_uncond`), so that they sample
   with classifier-free guidance at our weight `sample.guidance` (diffusers' UNet2DModel has
   no default weight; autoguidance is this project's and has no counterpart there).
   Each trains for the same seconds as ours at that model and budget, on the clock: a step
   starts only when it is expected (at the mean step time so far) to end within the budget.
   The cosine schedule needs its length up front: a calibration of a few steps on a
   throwaway copy of the same network (not counted) estimates how many steps fit, and the
   run also stops at that many steps should it get there first, so the learning rate never
   climbs back past the cosine's end. The steps taken and planned are in the table.
   Precision: diffusers trains and samples under the autocast the pipeline picks on this
   machine (bf16 where the CPU has native bf16, otherwise fp32; train.precision), as the
   example's --mixed_precision offers: fp32 alone would hand ours a speed advantage
   (docs/performance.md: UNet2DModel trains 1.4× faster under bf16 on Zen 4).
   Sampled with each `--theirs-samplers` entry `name:steps[:samples]`: DDPMScheduler over
   all 1,000 steps is what the example samples with (DDPMPipeline) and costs 100× our 10
   steps a sample, so by default it draws 200 samples (scored against the floor for 200);
   DDIMScheduler (η 0, its default "leading" spacing) at 50 steps and at our `sample.steps`
   draw the full --samples.

Every row's samples are scored as the evaluate stage scores its own
(ddpm_core.evaluation.SampleScorer, as benchmarks/score.py): FID under judge 1
(models/evaluator.pt) and judge 2 (models/evaluator_alt.pt), each divided by its floor
(the FID of as many real training images), precision and recall (k = 3, against as many
test images, in both judges' spaces), accuracy of the conditional samples (judge 1, and
judge 2 in the CSV), and the share of exact-zero pixels (real test digits: printed in the
header). The test set is `evaluate.test_subset` of it, all 10,000 by default.

Prints one table, a row per (recipe, model, budget, sampler): minutes trained, training
images/s, sampling images/s (generation only), FID × floor by judge 1 and judge 2,
precision / recall, accuracy, exact-zero pixels; then the ratios ours / theirs at equal
minutes (FID × floor below 1: ours is closer to real digits). Writes the rows to --out
(CSV) and rows, ratios and the run's settings to the same path with .json.

Needs data/dataset and both judges in models/ (`dvc repro fetch_data train_evaluator`,
or --data/--models elsewhere) and the bench extra (`pip install -e '.[bench]'`). The
minutes are this process's: keep the machine otherwise idle. A line before each piece of
work counts the pieces and estimates the time left (from the calibrations, then from what
was measured); training and sampling show their own bars.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import importlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark import machine, measure_training, versions  # noqa: E402
from sweep import override  # noqa: E402

from ddpm_core import fidelity, hardware  # noqa: E402
from ddpm_core.config import Params, parse_params  # noqa: E402
from ddpm_core.data import NUM_CLASSES, ImageSet, load_images, to_model_range, to_uint8  # noqa: E402
from ddpm_core.errors import DataError, exit_on_error  # noqa: E402
from ddpm_core.evaluation import PR_K, SampleScorer, judge_features, load_judges  # noqa: E402
from ddpm_core.files import write_atomic  # noqa: E402
from ddpm_core.generation import balanced_labels, generate, sampler_for  # noqa: E402
from ddpm_core.seeding import derived_seed  # noqa: E402
from ddpm_core.train import TrainingPlan, train_diffusion  # noqa: E402
from ddpm_core.unet import UNet, build_unet  # noqa: E402
from ddpm_core.viz import class_rows_grid, image_grid  # noqa: E402

OURS, SMALL, MATCHED = "ddpm_core", "diffusers-small", "diffusers-matched"
RECIPES = (OURS, SMALL, MATCHED)
KINDS = ("uncond", "cond")


@dataclass(frozen=True)
class TheirRecipe:
    """The defaults of diffusers' examples/unconditional_image_generation/train_unconditional.py."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    eps: float = 1e-8
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_max_decay: float = 0.9999
    ema_inv_gamma: float = 1.0
    ema_power: float = 3 / 4
    batch_size: int = 16
    timesteps: int = 1000


THEIRS = TheirRecipe()
SMALL_WIDTHS = (32, 64, 64)  # Hugging Face's diffusion course, MNIST: 2 layers a block, attention at 14 and 7 px
CALIBRATION = (3, 10)  # steps untimed, then timed, of the step-time estimates (--tiny: 1, 1)

# --tiny: the shape of tests/conftest.py's TINY, fewer steps, a few samples.
TINY_OVERRIDES = [
    "model.channels=[16, 32]", "model.attention_heads=2", "train.warmup_steps=2", "sample.steps=5",
    "sample.batch_size=100", "evaluate.test_subset=1000",
]  # fmt: skip
TINY_MAX_STEPS, TINY_SAMPLES, TINY_SAMPLERS = 4, 20, ["ddpm:4", "ddim:3"]


def sampler_spec(text: str) -> tuple[str, int, int | None]:
    """`ddim:50` → ("ddim", 50, None); `ddpm:1000:200` → ("ddpm", 1000, 200)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("ddpm", "ddim") or not all(p.isdigit() for p in parts[1:]):
        raise argparse.ArgumentTypeError(f"{text!r}: expected ddpm|ddim:STEPS[:SAMPLES], e.g. ddim:50 or ddpm:1000:200")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None


def budgets_arg(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive whole multiples of epochs, e.g. 1,3")
    return values


# ---------------------------------------------------------------- diffusers' recipe


def diffusers(module: str = "") -> Any:
    """diffusers (or one of its modules), untyped: the bench extra's, absent from a plain install."""
    return importlib.import_module(f"diffusers{module}")


def diffusers_unet(recipe: str, params: Params, conditional: bool, tiny: bool = False) -> nn.Module:
    m = params.model
    widths: tuple[int, ...]
    down: tuple[str, ...]
    if recipe == SMALL:
        widths = (16, 32, 32) if tiny else SMALL_WIDTHS
        down = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
        shape: dict[str, Any] = {"layers_per_block": 2, "norm_num_groups": 8 if tiny else 32}
    else:
        widths = tuple(m.channels)
        down = ("DownBlock2D",) * (len(widths) - 1) + ("AttnDownBlock2D",)
        shape = {"layers_per_block": m.blocks_per_level, "norm_num_groups": 8,
                 "attention_head_dim": widths[-1] // m.attention_heads}  # fmt: skip
    return diffusers().UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=widths,
        down_block_types=down, up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
        num_class_embeds=NUM_CLASSES + 1 if conditional else None, **shape,
    )  # fmt: skip


class TheirTraining:
    """One run of the example's recipe: the network, AdamW, warm-up + cosine, EMA."""

    def __init__(self, net: nn.Module, planned_steps: int, autocast: Callable[[], AbstractContextManager]):
        self.net, self.autocast = net, autocast
        self.noise = training_scheduler()
        self.optimizer = torch.optim.AdamW(
            net.parameters(), lr=THEIRS.lr, betas=THEIRS.betas, weight_decay=THEIRS.weight_decay, eps=THEIRS.eps
        )
        self.lr = diffusers(".optimization").get_cosine_schedule_with_warmup(
            self.optimizer, THEIRS.warmup_steps, planned_steps
        )
        self.ema = diffusers(".training_utils").EMAModel(
            net.parameters(), decay=THEIRS.ema_max_decay, use_ema_warmup=True,
            inv_gamma=THEIRS.ema_inv_gamma, power=THEIRS.ema_power,
        )  # fmt: skip

    def step(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = torch.randint(0, THEIRS.timesteps, (len(x0),), generator=generator).to(x0.device)
        self.net.train()
        with self.autocast():
            predicted = self.net(self.noise.add_noise(x0, noise, t), t, class_labels=labels).sample
        loss = F.mse_loss(predicted.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), THEIRS.grad_clip)
        self.optimizer.step()
        self.lr.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.net.parameters())
        return loss.detach()

    def ema_network(self) -> nn.Module:
        averaged = copy.deepcopy(self.net)
        self.ema.copy_to(averaged.parameters())
        return averaged.eval().requires_grad_(False)


class Batches:
    """Shuffled passes over the training images, `batch_size` at a time (the last one of a
    pass partial, as a DataLoader with shuffle=True gives), with dropped labels → null class."""

    def __init__(self, data: ImageSet, batch_size: int, p_uncond: float | None, generator: torch.Generator):
        self.data, self.batch_size, self.p_uncond, self.generator = data, batch_size, p_uncond, generator
        self.order, self.cursor = torch.randperm(len(data), generator=generator), 0

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cursor >= len(self.order):
            self.order, self.cursor = torch.randperm(len(self.data), generator=self.generator), 0
        idx = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += len(idx)
        labels = None
        if self.p_uncond is not None:
            drop = torch.rand(len(idx), generator=self.generator) < self.p_uncond
            labels = self.data.labels[idx].masked_fill(drop, NUM_CLASSES).to(device)
        return to_model_range(self.data.images[idx]).to(device), labels


def their_seconds_per_step(
    build: Callable[[], nn.Module], data: ImageSet, conditional: bool, batch_size: int, p_uncond: float,
    device: torch.device, autocast: Callable[[], AbstractContextManager], calibration: tuple[int, int],
) -> float:  # fmt: skip
    """Seconds a training step of this network takes here, on a throwaway copy."""
    run = TheirTraining(build(), 10**6, autocast)
    batches = Batches(data, batch_size, p_uncond if conditional else None, torch.Generator().manual_seed(0))
    warmup, timed = calibration
    for _ in range(warmup):
        run.step(*batches.next(device), batches.generator)
    started = time.perf_counter()
    for _ in range(timed):
        run.step(*batches.next(device), batches.generator).item()
    return (time.perf_counter() - started) / timed


@dataclass
class Trained:
    train_s: float
    steps: int
    images: int
    params_m: float
    model: nn.Module
    guide: nn.Module | None = None
    planned_steps: int | None = None
    last_step_s: float = 0.0  # on the clock (theirs): the last step's seconds, begun within the budget


def train_theirs(
    recipe: str, params: Params, conditional: bool, budget_s: float, step_s: float, data: ImageSet,
    batch_size: int, device: torch.device, precision: str, tiny: bool, desc: str,
) -> Trained:  # fmt: skip
    """The example's recipe for `budget_s` seconds on the clock (see the module's docstring)."""
    torch.manual_seed(derived_seed(params.seed, f"peers/{recipe}/{desc}/init"))
    net = hardware.place_model(diffusers_unet(recipe, params, conditional, tiny), device, precision)
    planned = max(1, math.floor(budget_s / step_s))
    run = TheirTraining(net, planned, hardware.autocast_factory(precision, device))
    generator = torch.Generator().manual_seed(derived_seed(params.seed, f"peers/{recipe}/{desc}/train"))
    batches = Batches(data, batch_size, params.train_cond.p_uncond if conditional else None, generator)
    trained, steps, images, seconds = 0.0, 0, 0, 0.0
    bar = tqdm(total=round(budget_s, 1), desc=desc, unit="s", mininterval=1.0, dynamic_ncols=True)
    # At least one step (a tiny test budget can be below one step's time); then on the clock.
    while steps == 0 or (steps < planned and trained + trained / steps <= budget_s):
        started = time.perf_counter()
        x0, labels = batches.next(device)
        loss = run.step(x0, labels, generator)
        if steps % 20 == 0:
            value = loss.item()
            if not math.isfinite(value):
                raise DataError(f"{desc}: loss became {value} at step {steps + 1}")
            bar.set_postfix(step=steps + 1, loss=f"{value:.4f}")
        seconds = time.perf_counter() - started
        trained, steps, images = trained + seconds, steps + 1, images + len(x0)
        bar.update(round(seconds, 1))
    bar.close()
    params_m = sum(p.numel() for p in net.parameters()) / 1e6
    model = hardware.place_model(run.ema_network(), device, hardware.sampling_precision(device))
    return Trained(trained, steps, images, params_m, model, planned_steps=planned, last_step_s=seconds)


@torch.inference_mode()
def sample_theirs(
    model: nn.Module, scheduler: Any, n: int, generator: torch.Generator, labels: torch.Tensor | None,
    guidance: float, batch_size: int, device: torch.device, autocast: Callable[[], AbstractContextManager], desc: str,
) -> torch.Tensor:  # fmt: skip
    """`n` uint8 images from a diffusers scheduler's loop, with classifier-free guidance
    ε_∅ + w (ε_y − ε_∅) when `labels` are given and w ≠ 1 (both passes in one batch)."""
    batches = []
    with tqdm(total=n, desc=desc, unit="img", mininterval=1.0) as bar:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            y = labels[start : start + count].to(device) if labels is not None else None
            x = torch.randn((count, 1, 28, 28), generator=generator).to(device) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                t_batch = torch.full((count,), int(t), device=device, dtype=torch.long)
                x_in = scheduler.scale_model_input(x, t)
                with autocast():
                    if y is not None and guidance != 1:
                        both = model(
                            torch.cat([x_in, x_in]), torch.cat([t_batch, t_batch]),
                            class_labels=torch.cat([y, torch.full_like(y, NUM_CLASSES)]),
                        ).sample.float()  # fmt: skip
                        eps_y, eps_null = both.chunk(2)
                        eps = eps_null + guidance * (eps_y - eps_null)
                    else:
                        eps = model(x_in, t_batch, class_labels=y).sample.float()
                x = scheduler.step(eps, t, x, generator=generator).prev_sample
            batches.append(to_uint8(x).cpu())
            bar.update(count)
    return torch.cat(batches)


def save_grid(path: Path, images: torch.Tensor, labels: torch.Tensor | None) -> None:
    """The first 100 of a row's uint8 samples as a PNG, 10 a row; conditional ones a row per class."""
    from PIL import Image

    x = to_model_range(images)
    per_class = int(torch.bincount(labels, minlength=NUM_CLASSES).min()) if labels is not None else 0
    if labels is not None and per_class:
        grid = class_rows_grid(x, labels, min(10, per_class), NUM_CLASSES)
    else:
        grid = image_grid(x[:100], nrow=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))


def training_scheduler() -> Any:
    """The example's noise schedule: DDPMScheduler, 1,000 steps, linear β, ε prediction."""
    return diffusers().DDPMScheduler(
        num_train_timesteps=THEIRS.timesteps, beta_schedule="linear", prediction_type="epsilon"
    )


def their_scheduler(name: str, steps: int) -> Any:
    """DDPMScheduler (as trained) or DDIMScheduler with its config, set to `steps` steps."""
    trained = training_scheduler()
    scheduler = trained if name == "ddpm" else diffusers().DDIMScheduler.from_config(trained.config)
    scheduler.set_timesteps(steps)
    return scheduler


# ---------------------------------------------------------------- ours


def ours_network(params: Params, weights: dict, conditional: bool, device: torch.device) -> UNet:
    """Weights as the sample stage loads them (generation.load_unet, from a state_dict)."""
    model = build_unet(params.model, NUM_CLASSES if conditional else None)
    model.load_state_dict(weights)
    return hardware.place_model(model, device, hardware.sampling_precision(device)).eval().requires_grad_(False)


def train_ours(params: Params, conditional: bool, data: ImageSet, device: torch.device, desc: str) -> Trained:
    with tempfile.TemporaryDirectory() as tmp:
        result = train_diffusion(data, params, conditional, Path(tmp) / "resume.pt", name=desc, device=device)
    plan = TrainingPlan.of(len(data), params, conditional)
    images = round(sum(r * s for r, s in zip(result.images_per_s, result.epoch_seconds, strict=True)))
    return Trained(
        train_s=sum(result.epoch_seconds),
        steps=plan.total_steps,
        images=images,
        params_m=sum(v.numel() for v in result.ema_state_dict.values()) / 1e6,
        model=ours_network(params, result.ema_state_dict, conditional, device),
        guide=ours_network(params, result.snapshots[plan.guide_step], conditional, device),
    )


# ---------------------------------------------------------------- judging


class Judging:
    """The evaluate stage's numbers for any N: SampleScorer (FID and its floor in both
    judges' spaces, accuracy, pixels) and precision/recall against the first N test images'
    features of each judge, as evaluation.fidelity_metrics takes them."""

    def __init__(self, scorer: SampleScorer):
        self.scorer = scorer

    def score(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        s = self.scorer.score(images, labels)
        row: dict[str, Any] = {
            "fid": s["fid"], "fid_floor": s["fid_floor"], "fid_x_floor": s["fid_over_floor"],
            "fid_alt": s["fid_alt"], "fid_alt_floor": s["fid_alt_floor"], "fid_alt_x_floor": s["fid_alt_over_floor"],
        }  # fmt: skip
        for name, judge in self.scorer.judges.items():
            suffix = f"_{name}" if name else ""
            real = self.scorer.fids[name].reference[: len(images)]
            inside_real, inside_fake = fidelity.precision_recall(real, judge_features(judge, images), PR_K)
            row[f"precision{suffix}"] = inside_real.double().mean().item()
            row[f"recall{suffix}"] = inside_fake.double().mean().item()
        row["accuracy"], row["accuracy_alt"] = s.get("accuracy"), s.get("accuracy_alt")
        row["class_deviation"] = s["max_class_deviation"]
        row["zero_pixels"], row["zero_pixels_real"] = s["zero_pixels"], s["zero_pixels_real"]
        return row


# ---------------------------------------------------------------- the run's progress


class Progress:
    """A line before each piece of work: which one of how many, time spent, time left by
    the current estimates (re-read each time, so they sharpen as measurements come in)."""

    def __init__(self, pieces: list[tuple[str, Callable[[], float]]]):
        self.pieces, self.done, self.started = pieces, 0, time.perf_counter()

    def next(self) -> None:
        label, _ = self.pieces[self.done]
        left = sum(estimate() for _, estimate in self.pieces[self.done :])
        spent = time.perf_counter() - self.started
        clock = lambda s: str(datetime.timedelta(seconds=round(s)))  # noqa: E731
        print(
            f"peers [{self.done + 1}/{len(self.pieces)}] {label}: {clock(spent)} spent, about {clock(left)} left",
            file=sys.stderr,
            flush=True,
        )
        self.done += 1


# ---------------------------------------------------------------- the table


COLUMNS = {  # CSV column → printed header
    "recipe": "recipe", "model": "model", "budget": "budget", "sampler": "sampler", "minutes": "min",
    "train_img_s": "train img/s", "sample_img_s": "sample img/s", "fid_x_floor": "FID×floor j1",
    "fid_alt_x_floor": "j2", "pr": "P/R", "accuracy": "accuracy", "zero_pixels": "zero px",
}  # fmt: skip
RATIOS = ("minutes", "train_img_s", "sample_img_s", "fid_x_floor", "fid_alt_x_floor", "precision", "recall",
          "accuracy", "zero_pixels")  # fmt: skip


def ratio_rows(rows: list[dict]) -> list[dict]:
    """ours / theirs for every row of theirs, at the same model and budget (equal minutes)."""
    ours = {(r["model"], r["budget"]): r for r in rows if r["recipe"] == OURS}
    out = []
    for r in rows:
        mine = ours.get((r["model"], r["budget"]))
        if r["recipe"] == OURS or mine is None:
            continue
        ratio = {"model": r["model"], "budget": r["budget"], "theirs": r["recipe"], "sampler": r["sampler"]}
        for key in RATIOS:
            a, b = mine.get(key), r.get(key)
            ratio[key] = a / b if a is not None and b else None
        out.append(ratio)
    return out


def printed(rows: list[dict], ratios: list[dict]) -> str:
    import pandas as pd

    table = pd.DataFrame(
        [
            {
                **{k: r[k] for k in ("recipe", "model", "sampler")},
                "budget": f"{r['budget']}×",
                "minutes": f"{r['minutes']:.2f}",
                "train_img_s": f"{r['train_img_s']:.0f}",
                "sample_img_s": f"{r['sample_img_s']:.1f}",
                "fid_x_floor": f"{r['fid_x_floor']:.2f}",
                "fid_alt_x_floor": f"{r['fid_alt_x_floor']:.2f}",
                "pr": f"{r['precision']:.2f}/{r['recall']:.2f}",
                "accuracy": "" if r["accuracy"] is None else f"{r['accuracy']:.1%}",
                "zero_pixels": f"{r['zero_pixels']:.1%}",
            }
            for r in rows
        ]
    )[list(COLUMNS)].rename(columns=COLUMNS)
    text = table.to_string(index=False)
    if ratios:
        frame = pd.DataFrame([{k: math.nan if v is None else v for k, v in r.items()} for r in ratios])
        frame["budget"] = frame["budget"].map(lambda b: f"{b}×")
        text += "\n\nours / theirs at equal minutes (FID × floor below 1: ours is closer to real digits)\n"
        text += frame.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="")
    return text


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value on params.yaml, as with dvc exp run -S")
    parser.add_argument(
        "--budgets", type=budgets_arg, default=[1, 3],
        help="training budgets as multiples of the default run's epochs, comma-separated (default: 1,3)",
    )  # fmt: skip
    parser.add_argument("--models", nargs="+", choices=KINDS, default=list(KINDS), help="default: both")
    parser.add_argument(
        "--recipes", nargs="+", choices=RECIPES, default=list(RECIPES),
        help=f"recipes to sample and score (default: all). {OURS} always trains: its minutes are the budget",
    )  # fmt: skip
    parser.add_argument(
        "--samples", type=int, help="images a row, and real images of the floors (default: evaluate.num_samples)"
    )
    parser.add_argument(
        "--theirs-samplers", nargs="+", type=sampler_spec, metavar="NAME:STEPS[:SAMPLES]",
        help="diffusers' samplers, each with its own number of samples if given (default: ddpm:1000:200 ddim:50 "
        "ddim:<sample.steps>)",
    )  # fmt: skip
    parser.add_argument(
        "--theirs-batch-size", type=int, default=THEIRS.batch_size,
        help=f"diffusers' training batch (default: the example's {THEIRS.batch_size})",
    )  # fmt: skip
    parser.add_argument(
        "--max-steps", type=int,
        help="train ours on the first N × train.batch_size images only: N optimizer steps a model at budget 1, "
        "so every training takes seconds (diffusers still follow on the clock)",
    )  # fmt: skip
    parser.add_argument(
        "--tiny", action="store_true",
        help=f"a run of seconds that passes every code path: {' '.join(TINY_OVERRIDES)}, --max-steps "
        f"{TINY_MAX_STEPS}, --samples {TINY_SAMPLES}, samplers {' '.join(TINY_SAMPLERS)}, diffusers-small at "
        "(16, 32, 32), calibrations of 1 + 1 steps. Its numbers mean nothing",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("peers.csv"),
        help="the table as CSV here, rows, ratios and settings as JSON beside it (.json), each row's first 100 "
        "samples as a PNG in <name>_grids/ (default: benchmarks/peers.csv)",
    )  # fmt: skip
    parser.add_argument(
        "--models-dir", type=Path, default=ROOT / "models", help="folder of evaluator.pt and evaluator_alt.pt"
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "dataset", help="the fetch_data output")
    args = parser.parse_args(argv)
    exit_on_error(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    threads = hardware.configure_threads()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = (TINY_OVERRIDES if args.tiny else []) + list(args.overrides)
    for assignment in overrides:
        override(raw, assignment)
    max_steps = args.max_steps or (TINY_MAX_STEPS if args.tiny else None)
    if max_steps:
        raw["data"]["train_subset"] = max_steps * raw["train"]["batch_size"]
    base = parse_params(raw)
    by_budget = {b: parse_params({**raw, "epochs": raw["epochs"] * b}) for b in args.budgets}
    theirs = [r for r in args.recipes if r != OURS]
    if theirs:
        try:
            diffusers()
        except ImportError:
            raise DataError("diffusers is not installed: pip install -e '.[bench]' (make peers does)") from None
    n = args.samples or (TINY_SAMPLES if args.tiny else base.evaluate.num_samples)
    sp = base.sample
    samplers = args.theirs_samplers or (
        [sampler_spec(s) for s in TINY_SAMPLERS] if args.tiny else [("ddpm", 1000, 200), ("ddim", 50, None), ("ddim", sp.steps, None)]
    )  # fmt: skip
    samplers = [(name, steps, min(count, n) if count else n) for name, steps, count in samplers]
    calibration = (1, 1) if args.tiny else CALIBRATION

    # Everything that can fail fast, before the slow part.
    device = hardware.pick_device()
    precision = hardware.resolve_precision(base.train.precision, device)
    judges = load_judges(args.models_dir)
    data = load_images(args.data, base.data.dataset, train=True, subset=base.data.train_subset)
    test = load_images(args.data, base.data.dataset, train=False, subset=base.evaluate.test_subset)
    most = max([n, *(count for _, _, count in samplers)])
    floor_images = load_images(args.data, base.data.dataset, train=True, subset=most).images
    judging = Judging(SampleScorer(judges, test.images, floor_images))
    autocast = hardware.sampling_autocast(device)
    print(f"machine: {machine()}; device {device}, {threads} torch threads", flush=True)
    print(f"versions: {versions()}; training precision {precision}", flush=True)
    print(f"settings: {' '.join(overrides) or 'params.yaml'}; {len(data)} training images", flush=True)

    # Step times: the ETA's, and the cosine schedule's length of diffusers' runs.
    ours_step_s = base.train.batch_size / measure_training(
        {"impl": "ddpm_core", "precision": precision, "warmup": calibration[0], "steps": calibration[1]}, base, device
    )["images_per_s"]  # fmt: skip
    their_step_s: dict[tuple[str, str], float] = {}
    for recipe in theirs:
        for kind in args.models:
            build = lambda r=recipe, k=kind: hardware.place_model(  # noqa: E731
                diffusers_unet(r, base, k == "cond", args.tiny), device, precision
            )
            their_step_s[(recipe, kind)] = their_seconds_per_step(
                build, data, kind == "cond", args.theirs_batch_size, base.train_cond.p_uncond, device,
                hardware.autocast_factory(precision, device), calibration,
            )  # fmt: skip
    print(
        f"calibration, seconds a training step: {OURS} {ours_step_s:.3f} (batch {base.train.batch_size}); "
        + "; ".join(f"{r} {k} {s:.3f}" for (r, k), s in their_step_s.items())
        + f" (batch {args.theirs_batch_size})",
        flush=True,
    )

    measured: dict[tuple[str, int], float] = {}  # (kind, budget) → ours' training seconds

    def budget_s(kind: str, budget: int) -> float:
        if (kind, budget) in measured:
            return measured[(kind, budget)]
        known = [(b, s) for (k, b), s in measured.items() if k == kind]
        if known:
            return known[0][1] * budget / known[0][0]
        return TrainingPlan.of(len(data), by_budget[budget], kind == "cond").total_steps * ours_step_s

    def sampling_s(recipe: str, kind: str, steps: int, count: int) -> float:
        """Network passes a sample × a forward pass's share (≈ 1/3) of a training step per image."""
        cond = kind == "cond"
        if recipe == OURS:
            passes = (2 if cond and sp.guidance != 1 else 1) + (
                (sp.autoguidance_cond if cond else sp.autoguidance_uncond) != 1
            )
            per_image = ours_step_s / base.train.batch_size
        else:
            passes = 2 if cond and sp.guidance != 1 else 1
            per_image = their_step_s[(recipe, kind)] / args.theirs_batch_size
        return count * steps * passes * per_image / 3

    pieces: list[tuple[str, Callable[[], float]]] = []
    for b in args.budgets:
        for kind in args.models:
            pieces.append((f"train {OURS} {kind} {b}×", functools.partial(budget_s, kind, b)))
            if OURS in args.recipes:
                pieces.append((f"sample {OURS} {kind} {b}×", functools.partial(sampling_s, OURS, kind, sp.steps, n)))
            for recipe in theirs:
                pieces.append((f"train {recipe} {kind} {b}×", functools.partial(budget_s, kind, b)))
                for name, steps, count in samplers:
                    label = f"sample {recipe} {kind} {b}× {name}:{steps}"
                    pieces.append((label, functools.partial(sampling_s, recipe, kind, steps, count)))
    progress = Progress(pieces)

    rows: list[dict] = []
    grids = args.out.with_name(args.out.stem + "_grids")  # a PNG of each row's samples

    def record(
        recipe: str, kind: str, b: int, sampler: str, trained: Trained, images: torch.Tensor,
        labels: torch.Tensor | None, seconds: float,
    ) -> None:  # fmt: skip
        row = {
            "recipe": recipe, "model": kind, "budget": b, "sampler": sampler,
            "minutes": trained.train_s / 60, "budget_minutes": measured[(kind, b)] / 60,
            "train_s": trained.train_s, "steps": trained.steps, "planned_steps": trained.planned_steps,
            "last_step_s": trained.last_step_s,
            "train_img_s": trained.images / trained.train_s if trained.train_s else 0.0,
            "params_m": trained.params_m, "samples": len(images), "sample_img_s": len(images) / seconds,
            **judging.score(images, labels),
        }  # fmt: skip
        rows.append(row)
        slug = f"{recipe}_{kind}_{b}x_{sampler}".replace(":", "").replace(" ", "_")
        save_grid(grids / f"{slug}.png", images, labels)
        print(json.dumps(row), flush=True)

    for b in args.budgets:
        params = by_budget[b]
        for kind in args.models:
            cond = kind == "cond"
            progress.next()
            mine = train_ours(params, cond, data, device, f"{OURS} {kind} {b}×")
            measured[(kind, b)] = mine.train_s
            generator_seed = derived_seed(params.seed, f"sample/{kind}")
            if OURS in args.recipes:
                progress.next()
                assert isinstance(mine.model, UNet) and isinstance(mine.guide, UNet)
                labels = balanced_labels(n) if cond else None
                started = time.perf_counter()
                images = generate(
                    mine.model, sampler_for(params.diffusion, sp.model_dump()), n,
                    torch.Generator().manual_seed(generator_seed), labels, sp.guidance if cond else 1.0,
                    sp.batch_size, device, autocast, desc=f"sample {OURS} {kind} {b}×", guide=mine.guide,
                    autoguidance=sp.autoguidance_cond if cond else sp.autoguidance_uncond,
                )  # fmt: skip
                seconds = time.perf_counter() - started
                guided = f" cfg{sp.guidance:g}" if cond else ""
                ag = sp.autoguidance_cond if cond else sp.autoguidance_uncond
                record(OURS, kind, b, f"{sp.sampler}:{sp.steps}{guided} ag{ag:g}", mine, images, labels, seconds)
            del mine
            for recipe in theirs:
                progress.next()
                trained = train_theirs(
                    recipe, params, cond, measured[(kind, b)], their_step_s[(recipe, kind)], data,
                    args.theirs_batch_size, device, precision, args.tiny, f"{recipe} {kind} {b}×",
                )  # fmt: skip
                for name, steps, count in samplers:
                    progress.next()
                    labels = balanced_labels(count) if cond else None
                    started = time.perf_counter()
                    images = sample_theirs(
                        trained.model, their_scheduler(name, steps), count,
                        torch.Generator().manual_seed(generator_seed), labels, sp.guidance if cond else 1.0,
                        sp.batch_size, device, autocast, f"sample {recipe} {kind} {b}× {name}:{steps}",
                    )  # fmt: skip
                    seconds = time.perf_counter() - started
                    guided = f" cfg{sp.guidance:g}" if cond else ""
                    record(recipe, kind, b, f"{name}:{steps}{guided}", trained, images, labels, seconds)

    ratios = ratio_rows(rows)
    real_zero = rows[0]["zero_pixels_real"] if rows else float("nan")
    print(f"\n{n} samples a row unless the sampler says otherwise; real test digits' exact-zero pixels {real_zero:.1%}")
    print(printed(rows, ratios), flush=True)

    import pandas as pd

    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    settings = {
        "machine": machine(), "versions": versions(), "device": str(device), "threads": threads,
        "precision": precision, "overrides": overrides, "budgets": args.budgets, "samples": n,
        "theirs_samplers": [f"{a}:{s}:{c}" for a, s, c in samplers], "theirs_batch_size": args.theirs_batch_size,
        "theirs": dataclasses.asdict(THEIRS),
        "calibration_step_s": {OURS: ours_step_s, **{f"{r} {k}": s for (r, k), s in their_step_s.items()}},
    }  # fmt: skip
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps({"settings": settings, "rows": rows, "ratios": ratios}, indent=2) + "\n")
    print(f"\nwrote {args.out} and {json_path}", flush=True)


if __name__ == "__main__":
    main()
