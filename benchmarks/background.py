"""Where a model's grey background comes from: three measurements of one trained model.

    python benchmarks/background.py                                   # models/uncond.pt at params.yaml
    python benchmarks/background.py models/cond.pt --cond
    python benchmarks/background.py benchmarks/.cache/1c9c36892b5b5033.pt diffusion.offset_noise=0.1

MNIST's background is exactly 0; a sample's is often a few grey levels above. This
prints, in grey levels (1 level = 2/255 in the model's [−1, 1] units):

1. denoising: real test digits noised to x_t at several timesteps; the mean and spread
   of the error of the network's x̂₀ on background pixels, and the share of them that
   would round to 0. This is the best the last sampling step can do, given a perfect
   path to it.
2. a shifted level: the same, with every pixel of the clean digits raised by 4.5 levels
   before noising; how much of the shift is still in x̂₀. A denoiser of MNIST would
   remove it all (no MNIST digit has a grey background). GroupNorm hides an image's
   level as a whole from the network, so what it has not been trained to see
   (`diffusion.offset_noise`) it passes on.
3. sampling: 256 images with the pipeline's sampler; at each step, each image's level as
   a whole (the median of x̂₀ over its top and bottom three rows, which are background in
   MNIST), as mean and 10th/90th percentiles across images, and its correlation with the
   image's final share of zero pixels.

The weights are a models/*.pt state_dict or a `benchmarks/sweep.py` cache file; the
params are params.yaml's with the `key=value` overrides (as in sweep.py) that trained
them. Needs data/dataset (`dvc repro fetch_data`). About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from sweep import override  # noqa: E402

from ddpm_core import hardware  # noqa: E402
from ddpm_core.config import parse_params  # noqa: E402
from ddpm_core.data import NUM_CLASSES, load_images  # noqa: E402
from ddpm_core.diffusion import x0_and_eps  # noqa: E402
from ddpm_core.files import load_safe  # noqa: E402
from ddpm_core.samplers import make_sampler, sample  # noqa: E402
from ddpm_core.schedule import make_schedule  # noqa: E402
from ddpm_core.unet import build_unet  # noqa: E402

LEVEL = 127.5  # grey levels per unit of the model's [−1, 1] scale
TIMESTEPS = (0, 2, 5, 10, 20, 40, 99, 200, 400)
SHIFT = 4.5  # grey levels added to every pixel in measurement 2
N = 256


def image_level(x0: torch.Tensor) -> torch.Tensor:
    """Each image's level as a whole, in grey levels above 0: the median of its top and
    bottom three rows, which are background in MNIST."""
    rows = torch.cat([x0[:, :, :3].flatten(1), x0[:, :, -3:].flatten(1)], dim=1)
    return (rows.median(dim=1).values + 1) * LEVEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "weights", nargs="?", type=Path, help="default: models/uncond.pt, or models/cond.pt with --cond"
    )
    parser.add_argument("overrides", nargs="*", help="key=value: the params the weights were trained with")
    parser.add_argument("--cond", action="store_true", help="a conditional model (measured with the digits' labels)")
    args = parser.parse_args()
    if args.weights is not None and "=" in str(args.weights):  # only overrides were given
        args.overrides.insert(0, str(args.weights))
        args.weights = None

    hardware.configure_threads()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for assignment in args.overrides:
        override(raw, assignment)
    params = parse_params(raw)
    path = args.weights or ROOT / "models" / ("cond.pt" if args.cond else "uncond.pt")
    state = load_safe(path)
    model = build_unet(params.model, NUM_CLASSES if args.cond else None)
    model.load_state_dict(state.get("weights", state))  # a sweep cache file, or a state_dict
    model.eval().requires_grad_(False)
    device = torch.device("cpu")
    autocast = hardware.sampling_autocast(device)
    schedule = make_schedule(params.diffusion.schedule, params.diffusion.timesteps)
    prediction = params.diffusion.prediction

    test = load_images(ROOT / "data" / "dataset", params.data.dataset, train=False)
    digits, labels = test.images[:N].float() / LEVEL - 1, test.labels[:N] if args.cond else None
    background = test.images[:N] == 0
    print(f"{path}: {params.diffusion.prediction}-prediction, offset noise {params.diffusion.offset_noise}, "
          f"Min-SNR {params.train.min_snr_gamma}; {N} test digits, {background.float().mean():.1%} background pixels")  # fmt: skip

    print(f"\n1-2. x̂₀ on background pixels (grey levels), and what is left of a {SHIFT}-level shift")
    print("   t   sigma   error mean   error std   rounds to 0   shift left")
    for t in TIMESTEPS:
        alpha_bar = schedule.alpha_bar_at(torch.tensor(t))
        noise = torch.randn(digits.shape, generator=torch.Generator().manual_seed(t))
        seen = []
        for shift in (0.0, SHIFT / LEVEL):
            xt = alpha_bar.sqrt() * (digits + shift) + (1 - alpha_bar).sqrt() * noise
            with torch.inference_mode(), autocast():
                output = model(xt, torch.full((N,), t), labels).float()
            seen.append((x0_and_eps(alpha_bar, xt, output, prediction)[0] - digits)[background] * LEVEL)
        error, shifted = seen
        zero = (error / LEVEL - 1).clamp(-1, 1).add(1).mul(LEVEL).round().eq(0).float().mean()
        print(f"{t:4d}   {(1 - alpha_bar).sqrt():.3f}   {error.mean():10.2f}   {error.std():9.2f}   {zero:11.1%}"
              f"   {shifted.mean() / SHIFT:10.0%}")  # fmt: skip

    sp = params.sample
    sampler = make_sampler(
        sp.sampler, schedule, sp.steps, sp.eta, prediction, offset_noise=params.diffusion.offset_noise, t_min=sp.t_min
    )
    levels: list[tuple[int, torch.Tensor]] = []

    def watch(k: int, x: torch.Tensor, x0: torch.Tensor | None) -> None:
        if x0 is not None:
            levels.append((int(sampler.timesteps[k - 1]), image_level(x0)))

    guidance = sp.guidance if args.cond else 1.0
    images = sample(
        model,
        sampler,
        (N, 1, 28, 28),
        torch.Generator().manual_seed(params.seed),
        labels,
        guidance,
        device,
        autocast,
        watch,
    )
    zeros = ((images + 1) * LEVEL).round().eq(0).float().mean(dim=(1, 2, 3))
    print(f"\n3. sampling ({sp.sampler}, {sp.steps} steps{f', guidance {guidance:g}' if args.cond else ''}): "
          "each image's level as a whole in x̂₀ (grey levels)")  # fmt: skip
    print("   t    mean    q10    q90   corr. with the image's zero share")
    for t, level in levels:
        q10, q90 = level.quantile(torch.tensor([0.1, 0.9])).tolist()
        corr = torch.corrcoef(torch.stack([level, zeros]))[0, 1]
        print(f"{t:4d}  {level.mean():6.2f}  {q10:5.2f}  {q90:5.2f}   {corr:5.2f}")
    print(
        f"exact-zero pixels of the samples: {zeros.mean():.1%}; per image, 10th/50th/90th percentile "
        + " / ".join(f"{q:.0%}" for q in zeros.quantile(torch.tensor([0.1, 0.5, 0.9])).tolist())
    )


if __name__ == "__main__":
    main()
