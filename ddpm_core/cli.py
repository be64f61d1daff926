"""`ddpm`, the command line of the project (also `python -m ddpm_core`)."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from PIL import Image
from pydantic import ValidationError
from tqdm import tqdm

from ddpm_core import hardware
from ddpm_core.animation import FrameRecorder, save_gif
from ddpm_core.config import DiffusionParams, ModelParams, load_params
from ddpm_core.errors import CheckpointError, ConfigError, DDPMError, TrackingError
from ddpm_core.files import write_atomic
from ddpm_core.generation import load_unet
from ddpm_core.prompts import CLASS_NAMES, accepted, parse_prompt
from ddpm_core.samplers import SAMPLERS, make_sampler, sample
from ddpm_core.schedule import make_schedule
from ddpm_core.seeding import seed_everything
from ddpm_core.viz import image_grid

# The `sample` section of the project's params.yaml, for when there is none in the
# current folder (with --run-id the weights need no params.yaml).
FALLBACK_SAMPLE = {"sampler": "dpmpp2m", "steps": 20, "guidance": 3.0, "eta": 0.0}

GENERATE_EPILOG = """\
examples:
  ddpm generate --prompt 7                            # eight sevens in generated.png
  ddpm generate --prompt "three one four" --n 4 --out pi.png
  ddpm generate --prompt "0 1 2 3 4 5 6 7 8 9" --animate denoising.gif
  ddpm generate --unconditional --n 100 --seed 1
  ddpm generate --prompt 2 --run-id <MLflow run id>   # a train_cond run or a pipeline run

Run it in the project folder: models/ and params.yaml (architecture, noise schedule,
sampler defaults) are read from there, and --run-id looks in its MLflow store
(MLFLOW_TRACKING_URI overrides). The same arguments and seed give the same image.
"""


class UsageError(DDPMError):
    exit_code = 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="Diffusion models on MNIST: draw digits from a trained model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = commands.add_parser(
        "generate",
        help="draw digits into a PNG grid (and a denoising GIF)",
        description="Draw digits from the trained conditional model (or the unconditional one) into a PNG\n"
        "grid, one row per digit of the prompt.",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--prompt", help=f'the digits to draw, separated by spaces or commas, each as {accepted(CLASS_NAMES["mnist"])} '
                     '(any case): "7", "Seven", "3 1 4"')  # fmt: skip
    gen.add_argument("--unconditional", action="store_true", help="use the unconditional model instead: any digits, no --prompt")
    gen.add_argument("--n", type=_positive_int, default=8, help="images per digit of the prompt; with --unconditional, images in all (default 8)")
    gen.add_argument("--guidance", type=_non_negative_float, help="classifier-free guidance weight: 1 = plain conditional, "
                     "higher = more typical digits (default: sample.guidance of params.yaml)")  # fmt: skip
    gen.add_argument("--sampler", choices=SAMPLERS, help="sampling method (default: sample.sampler of params.yaml)")
    gen.add_argument("--steps", type=_positive_int, help="sampling steps; ddpm always takes all T (default: sample.steps of params.yaml)")
    gen.add_argument("--seed", type=int, default=0, help="all noise derives from it (default 0)")
    gen.add_argument("--out", type=Path, default=Path("generated.png"), help="the PNG to write (default generated.png)")
    gen.add_argument("--animate", type=Path, metavar="GIF", help="also write the sampling, from noise to digits, as an animated GIF")
    gen.add_argument("--frames", choices=("xt", "x0"), default="xt",
                     help="what the GIF shows at each step: the noisy image x_t (default) or the model's prediction of the clean image")  # fmt: skip
    gen.add_argument("--run-id", help="load the weights logged by this MLflow run (a train_cond or train_uncond run, "
                     "or a pipeline's parent run) instead of models/")  # fmt: skip
    gen.set_defaults(func=generate)
    return parser


def _sample_defaults() -> dict:
    if Path("params.yaml").exists():
        return load_params("params.yaml").sample.model_dump()
    return FALLBACK_SAMPLE


def _section(flat: dict[str, str], name: str) -> dict:
    """{'model.channels': '[16, 32]'} → {'channels': [16, 32]}: MLflow logs params as text."""
    prefix = f"{name}."
    return {k.removeprefix(prefix): yaml.safe_load(v) for k, v in flat.items() if k.startswith(prefix)}


def _load_model(run_id: str | None, kind: str, device: torch.device) -> tuple[torch.nn.Module, DiffusionParams, str]:
    """The model, its noise schedule's params, and where it came from."""
    conditional = kind == "cond"
    if run_id is None:
        path = Path("models") / f"{kind}.pt"
        if not path.exists():
            raise CheckpointError(f"{path}: not found; train it with `dvc repro train_{kind}`, or load one from MLflow with --run-id")
        if not Path("params.yaml").exists():
            raise ConfigError("params.yaml: not found; the models/ weights need the params they were trained with: run in the project folder")
        params = load_params("params.yaml")
        return load_unet(path, params.model, conditional, device), params.diffusion, str(path)
    from ddpm_core import tracking  # imports mlflow: only when asked for

    with tempfile.TemporaryDirectory() as tmp:
        path, logged = tracking.checkpoint_from_run(Path.cwd(), run_id, kind, Path(tmp))
        try:
            model_params = ModelParams.model_validate(_section(logged, "model"))
            diffusion = DiffusionParams.model_validate(_section(logged, "diffusion"))
        except ValidationError as exc:
            raise TrackingError(f"MLflow run {run_id}: its logged model/diffusion params are unusable ({exc.errors()[0]['msg']})") from None
        return load_unet(path, model_params, conditional, device), diffusion, f"MLflow run {run_id}"


def generate(args: argparse.Namespace) -> None:
    if args.unconditional and args.prompt:
        raise UsageError("--unconditional draws any digit; leave out --prompt")
    if not args.unconditional and args.prompt is None:
        raise UsageError(f'say which digits: --prompt "3 1 4" ({accepted(CLASS_NAMES["mnist"])}), or --unconditional')
    classes = [] if args.unconditional else parse_prompt(args.prompt)
    defaults = _sample_defaults()
    sampler_name = args.sampler or defaults["sampler"]
    steps = args.steps or defaults["steps"]
    guidance = defaults["guidance"] if args.guidance is None else args.guidance

    hardware.configure_threads()
    device = hardware.pick_device()
    kind = "uncond" if args.unconditional else "cond"
    model, diffusion, source = _load_model(args.run_id, kind, device)
    if sampler_name != "ddpm" and steps > diffusion.timesteps:
        raise UsageError(f"--steps {steps}: the model has {diffusion.timesteps} diffusion timesteps, steps can't exceed that")
    sampler = make_sampler(sampler_name, make_schedule(diffusion.schedule, diffusion.timesteps), steps, defaults["eta"])

    labels = torch.tensor(classes).repeat_interleave(args.n) if classes else None
    count = len(labels) if labels is not None else args.n
    nrow = args.n if classes else min(args.n, 10)
    recorder = FrameRecorder(len(sampler.timesteps), nrow, args.frames) if args.animate else None
    autocast = hardware.autocast_factory(hardware.resolve_precision("auto", device), device)
    generator = seed_everything(args.seed)
    # One batch: the animation needs every image at every step, and it keeps the image
    # the same with or without --animate.
    with tqdm(total=len(sampler.timesteps), desc="sampling", unit="step", mininterval=1.0, leave=False) as bar:

        def on_step(k, x, x0):
            bar.update(k > 0)
            if recorder is not None:
                recorder(k, x, x0)

        images = sample(model, sampler, (count, 1, 28, 28), generator, labels, guidance if classes else 1.0, device, autocast, on_step)

    grid = image_grid(images, nrow)
    write_atomic(args.out, lambda f: Image.fromarray(grid).save(f, format="PNG"))
    what = f"digits {' '.join(map(str, classes))}, guidance {guidance:g}" if classes else "unconditional"
    print(f"wrote {args.out}: {count} images ({what}; {sampler_name}, {len(sampler.timesteps)} steps, seed {args.seed}; {source})")
    if recorder is not None:
        save_gif(args.animate, recorder.frames)
        print(f"wrote {args.animate}: {len(recorder.frames)} frames")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DDPMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:
        print(f"error: {exc.filename}: {exc.strerror}" if exc.filename else f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
