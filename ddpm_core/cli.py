"""`ddpm`, the command line of the project (also `python -m ddpm_core`)."""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import cast

import torch
from PIL import Image
from tqdm import tqdm

from ddpm_core import envvars, hardware
from ddpm_core.animation import FrameRecorder, save_gif
from ddpm_core.config import (
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_TIMESTEPS,
    DiffusionParams,
    load_params,
    parse_guidance_interval,
)
from ddpm_core.data import DATASETS
from ddpm_core.errors import CheckpointError, ConfigError, DDPMError, exit_on_error
from ddpm_core.files import write_atomic
from ddpm_core.generation import DEFAULT_SAMPLE, load_unet, params_from_logged, sampler_for
from ddpm_core.prompts import CLASS_NAMES, accepted, parse_dataset_prompt
from ddpm_core.samplers import SAMPLERS, guided_timesteps, sample
from ddpm_core.seeding import seed_everything
from ddpm_core.unet import UNet
from ddpm_core.viz import image_grid

# Sampler defaults when there is no params.yaml in the current folder (with --run-id or
# --model the weights need none).
FALLBACK_SAMPLE = DEFAULT_SAMPLE

GENERATE_EPILOG = """\
examples:
  ddpm generate --prompt 7                            # eight sevens in generated.png
  ddpm generate --prompt "three one four" --n 4 --out pi.png
  ddpm generate --prompt "0 1 2 3 4 5 6 7 8 9" --animate denoising.gif
  ddpm generate --prompt "sneaker, bag, ankle boot"   # with data.dataset: fashion-mnist
  ddpm generate --unconditional --n 100 --seed 1
  ddpm generate --prompt 2 --run-id <MLflow run id>   # a train_cond run or a pipeline run
  ddpm generate --prompt 2 --model models:/ddpm-mnist-cond/1   # a registered version
  ddpm generate --prompt 2 --model models:/ddpm-mnist-cond/latest   # its newest version
  ddpm generate --prompt 2 --autoguidance 2           # guided by models/cond_guide.pt
  ddpm generate --unconditional --model models:/ddpm-mnist-uncond@champion

Run it in the project folder: models/ and params.yaml (dataset, architecture, noise
schedule, sampler defaults) are read from there, and --run-id looks in its MLflow store
(MLFLOW_TRACKING_URI overrides) and takes the dataset that run was trained on. The same
arguments and seed give the same image.

Autoguidance pushes the model away from its guide, an earlier EMA snapshot of the same
training: models/<kind>_guide.pt beside models/<kind>.pt, or the guide logged with the
model or run of --model/--run-id. Weight 1 leaves the guide out.
"""


PROMPT_EXAMPLE = {"mnist": '"3 1 4"', "fashion-mnist": '"sneaker, Ankle boot"'}


class UsageError(DDPMError):
    exit_code = 2


# One batch of images is drawn at once (the GIF needs all of them at every step).
MAX_IMAGES = 2000
MAX_STEPS = MAX_TIMESTEPS


def _whole(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _whole(text, 1, MAX_STEPS)


def _count(text: str) -> int:
    return _whole(text, 1, MAX_IMAGES)


def _seed(text: str) -> int:
    return _whole(text, 0, MAX_SEED)


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
        raise argparse.ArgumentTypeError(f"must be a number from 0 to {MAX_GUIDANCE:g}, got {text!r}")
    return value


def _interval(text: str) -> list[int] | str:
    """`LO:HI` → [LO, HI] (timesteps, LO ≤ HI); `all` (guidance at every step) stays `all`,
    apart from an option not given (params.yaml's interval)."""
    try:
        interval = parse_guidance_interval(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return "all" if interval is None else interval


def _local_dataset() -> str:
    """data.dataset of ./params.yaml, or mnist when there is none."""
    return load_params("params.yaml").data.dataset if Path("params.yaml").exists() else "mnist"


def _dataset_for_messages() -> str:
    try:
        return _local_dataset()
    except DDPMError:  # a broken params.yaml must not break --help or a usage message
        return "mnist"


def _prompt_help() -> str:
    dataset = _dataset_for_messages()
    return (f"the classes to draw, separated by spaces or commas, each as {accepted(CLASS_NAMES[dataset])} "
            f"(any case; the classes of {DATASETS[dataset].title}, data.dataset of params.yaml here; with --run-id, "
            f"of the dataset that run trained on), e.g. {PROMPT_EXAMPLE[dataset]}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm", description="Diffusion models on MNIST or Fashion-MNIST: draw images from a trained model."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = commands.add_parser(
        "generate",
        help="draw digits (or Fashion-MNIST's clothes) into a PNG grid (and a denoising GIF)",
        description="Draw images from the trained conditional model (or the unconditional one) into a PNG\n"
        "grid, one row per class of the prompt: digits, or clothes with data.dataset: fashion-mnist.",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--prompt", help=_prompt_help())
    gen.add_argument(
        "--unconditional", action="store_true", help="use the unconditional model instead: any classes, no --prompt"
    )
    gen.add_argument(
        "--n",
        type=_count,
        default=8,
        help=f"images per class of the prompt; with --unconditional, images in all (default 8; at most "
        f"{MAX_IMAGES} in all)",
    )
    gen.add_argument("--guidance", type=_weight, help="classifier-free guidance weight from 0 to 20: 1 = plain conditional, "
                     "higher = more typical images (default: sample.guidance of params.yaml)")  # fmt: skip
    gen.add_argument("--guidance-interval", type=_interval, metavar="LO:HI",
                     help="apply --guidance only at the steps whose timestep t has LO <= t <= HI (e.g. 0:340, the last 4 "
                     "of 10 steps: more varied digits, docs/performance.md); `all`: every step (default: "
                     "sample.guidance_interval of params.yaml)")  # fmt: skip
    gen.add_argument("--autoguidance", type=_weight, metavar="W",
                     help="autoguidance weight: how far the model is pushed away from its guide, an earlier snapshot of "
                     "its training (models/<kind>_guide.pt); 1 = off, 0 = the guide alone (default: sample.autoguidance_cond, "
                     "or sample.autoguidance_uncond with --unconditional, of params.yaml; with --run-id or --model "
                     f"{DEFAULT_SAMPLE['autoguidance_cond']:g} (conditional) or {DEFAULT_SAMPLE['autoguidance_uncond']:g} "
                     "(unconditional) with the guide logged beside the weights; weights logged without one are sampled without)")  # fmt: skip
    gen.add_argument("--sampler", choices=SAMPLERS, help="sampling method (default: sample.sampler of params.yaml)")
    gen.add_argument(
        "--steps",
        type=_positive_int,
        help="sampling steps; ddpm always takes all T (default: sample.steps of params.yaml)",
    )
    gen.add_argument("--seed", type=_seed, default=0, help=f"all noise derives from it: 0 to {MAX_SEED} (default 0)")
    gen.add_argument("--out", type=Path, default=Path("generated.png"), help="the PNG to write (default generated.png)")
    gen.add_argument(
        "--animate", type=Path, metavar="GIF", help="also write the sampling, from noise to images, as an animated GIF"
    )
    gen.add_argument("--frames", choices=("xt", "x0"), default="xt",
                     help="what the GIF shows at each step: the noisy image x_t (default) or the model's prediction of the clean image")  # fmt: skip
    gen.add_argument("--run-id", help="load the weights logged by this MLflow run (a train_cond or train_uncond run, "
                     "or a pipeline's parent run) instead of models/")  # fmt: skip
    gen.add_argument("--model", metavar="URI", help="load a registered model instead of models/: models:/ddpm-mnist-cond/<version>, "
                     "models:/ddpm-mnist-cond/latest (the newest version), models:/ddpm-mnist-cond@<alias> (or -uncond with "
                     "--unconditional), or a logged model models:/<model id>")  # fmt: skip
    gen.set_defaults(func=generate)
    return parser


def _sample_defaults() -> dict:
    if Path("params.yaml").exists():
        return load_params("params.yaml").sample.model_dump()
    return FALLBACK_SAMPLE


def _load_model(
    args: argparse.Namespace, kind: str, device: torch.device, autoguidance: float
) -> tuple[UNet, UNet | None, DiffusionParams, str, str]:
    """The model, its autoguidance guide (None when `autoguidance` is 1, or when weights
    from MLflow have none and --autoguidance was not given), its noise schedule's params,
    where it came from, and its dataset: models/<kind>.pt (and models/<kind>_guide.pt)
    with ./params.yaml, or the weights, guide and params of --run-id or --model."""
    conditional = kind == "cond"
    if args.run_id is None and args.model is None:
        path = Path("models") / f"{kind}.pt"
        if not path.exists():
            raise CheckpointError(
                f"{path}: not found; train it with `dvc repro train_{kind}`, or load one from MLflow with --run-id or --model"
            )
        if not Path("params.yaml").exists():
            raise ConfigError(
                "params.yaml: not found; the models/ weights need the params they were trained with: run in the project folder"
            )
        params = load_params("params.yaml")
        guide = None
        if autoguidance != 1:
            guide_path = Path("models") / f"{kind}_guide.pt"
            if not guide_path.exists():
                raise CheckpointError(
                    f"{guide_path}: not found; autoguidance {autoguidance:g} needs the guide: train it with "
                    f"`dvc repro train_{kind}`, or give --autoguidance 1"
                )
            guide = load_unet(guide_path, params.model, conditional, device)
        model = load_unet(path, params.model, conditional, device)
        return model, guide, params.diffusion, str(path), params.data.dataset
    from ddpm_core import tracking  # imports mlflow: only when asked for

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is not None:
            checkpoint = tracking.checkpoint_from_model(Path.cwd(), args.model, kind, Path(tmp))
            source = args.model
        else:
            checkpoint = tracking.checkpoint_from_run(Path.cwd(), args.run_id, kind, Path(tmp))
            source = f"MLflow run {args.run_id}"
        model_params, diffusion, dataset = params_from_logged(checkpoint.params, source)
        if checkpoint.guide is None and autoguidance != 1 and args.autoguidance is not None:
            raise UsageError(
                f"--autoguidance {autoguidance:g}: {source} has no autoguidance guide (logged before guides were); "
                "leave out --autoguidance"
            )
        guide = None
        again = "log or register it again (`dvc repro`), or name another run or model"
        if checkpoint.guide is not None and autoguidance != 1:
            guide = load_unet(checkpoint.guide, model_params, conditional, device, f"{source} (its guide)", again)
        model = load_unet(checkpoint.weights, model_params, conditional, device, source, again)
        return model, guide, diffusion, source, dataset


def _classes(args: argparse.Namespace, dataset: str) -> list[int]:
    return [] if args.unconditional else parse_dataset_prompt(args.prompt, dataset)


def _check_count(n: int, classes: list[int]) -> None:
    if classes and n * len(classes) > MAX_IMAGES:
        raise UsageError(
            f"--n {n} for each of {len(classes)} classes is {n * len(classes)} images; give at most {MAX_IMAGES} in all"
        )


def generate(args: argparse.Namespace) -> None:
    envvars.check_environment()
    hardware.configure_threads()
    if args.unconditional and args.prompt:
        raise UsageError("--unconditional draws any class; leave out --prompt")
    if not args.unconditional and args.prompt is None:
        dataset = _dataset_for_messages()
        raise UsageError(
            f"say which classes: --prompt {PROMPT_EXAMPLE[dataset]} ({accepted(CLASS_NAMES[dataset])}), or --unconditional"
        )
    # Without --run-id the dataset is params.yaml's: refuse a bad prompt before loading anything.
    if args.run_id and args.model:
        raise UsageError("--run-id and --model both name the weights; give one")
    for option, path, example in (("--out", args.out, "generated.png"), ("--animate", args.animate, "denoising.gif")):
        if path is not None and path.is_dir():
            raise UsageError(f"{option} {path}: a folder; name a file in it, e.g. {path / example}")
    classes = None if (args.run_id or args.model) else _classes(args, _local_dataset())
    if classes is not None:
        _check_count(args.n, classes)
    defaults = _sample_defaults()
    sampler_name = args.sampler or defaults["sampler"]
    steps = args.steps or defaults["steps"]
    guidance = defaults["guidance"] if args.guidance is None else args.guidance
    given = args.guidance_interval
    interval = defaults.get("guidance_interval") if given is None else None if given == "all" else given
    kind = "uncond" if args.unconditional else "cond"
    # params.yaml's weight goes with models/<kind>_guide.pt; weights from MLflow get the project's default.
    autoguidance_defaults = DEFAULT_SAMPLE if (args.run_id or args.model) else defaults
    autoguidance = float(
        cast(float, autoguidance_defaults[f"autoguidance_{kind}"]) if args.autoguidance is None else args.autoguidance
    )

    device = hardware.pick_device()
    model, guide, diffusion, source, dataset = _load_model(args, kind, device, autoguidance)
    if guide is None:
        autoguidance = 1.0  # weights from MLflow without a guide: sampled as before
    if classes is None:
        classes = _classes(args, dataset)
    if sampler_name != "ddpm" and steps > diffusion.timesteps:
        raise UsageError(
            f"--steps {steps}: the model has {diffusion.timesteps} diffusion timesteps, steps can't exceed that"
        )
    sampler = sampler_for(diffusion, {**defaults, "sampler": sampler_name}, steps)
    visited = sampler.timesteps.tolist()
    if classes and interval is not None and not guided_timesteps(visited, interval):
        raise UsageError(
            f"guidance interval {interval[0]}:{interval[1]} holds none of the sampler's timesteps "
            f"({', '.join(map(str, visited[:12]))}{', …' if len(visited) > 12 else ''}): guidance would never apply; "
            "widen it, or give --guidance-interval all"
        )

    labels = torch.tensor(classes).repeat_interleave(args.n) if classes else None
    count = len(labels) if labels is not None else args.n
    if args.run_id or args.model:  # the classes were known only now (the run's dataset)
        _check_count(args.n, classes)
    nrow = args.n if classes else min(args.n, 10)
    recorder = FrameRecorder(len(sampler.timesteps), nrow, args.frames) if args.animate else None
    autocast = hardware.sampling_autocast(device)
    generator = seed_everything(args.seed)
    # One batch: the animation needs every image at every step, and it keeps the image
    # the same with or without --animate.
    with tqdm(total=len(sampler.timesteps), desc="sampling", unit="step", mininterval=1.0, leave=False) as bar:

        def on_step(k, x, x0):
            bar.update(k > 0)
            if recorder is not None:
                recorder(k, x, x0)

        images = sample(
            model,
            sampler,
            (count, 1, 28, 28),
            generator,
            labels,
            guidance if classes else 1.0,
            device,
            autocast,
            on_step,
            guide=guide,
            autoguidance=autoguidance,
            guidance_interval=interval,
        )

    grid = image_grid(images, nrow)
    write_atomic(args.out, lambda f: Image.fromarray(grid).save(f, format="PNG"))
    if dataset == "mnist":
        what = f"digits {' '.join(map(str, classes))}"
    else:
        what = f"classes {', '.join(CLASS_NAMES[dataset][c] for c in classes)}"
    what = f"{what}, guidance {guidance:g}" if classes else "unconditional"
    if classes and interval is not None:
        what = f"{what} at t in [{interval[0]}, {interval[1]}]"
    if autoguidance != 1:
        what = f"{what}, autoguidance {autoguidance:g}"
    print(
        f"wrote {args.out}: {count} images ({what}; {sampler_name}, {len(sampler.timesteps)} steps, seed {args.seed}; {source})"
    )
    if recorder is not None:
        save_gif(args.animate, recorder.frames)
        print(f"wrote {args.animate}: {len(recorder.frames)} frames")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    exit_on_error(lambda: args.func(args))
