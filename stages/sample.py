"""Stage sample: draw images from the EMA weights of both diffusion models.

With `sample.sampler`, `sample.steps`, `sample.guidance` (at the steps of
`sample.guidance_interval`; and `sample.eta`), and
autoguidance by each model's guide (models/<kind>_guide.pt, an earlier EMA snapshot of
the same training) at `sample.autoguidance_uncond` / `sample.autoguidance_cond`, draws
`evaluate.num_samples` unconditional images and as many conditional ones, balanced over
the ten classes. Writes data/samples/uncond.npz (array `images`, uint8, N×28×28),
data/samples/cond.npz (`images` and `labels`, int64) and PNG grids beside them
(unconditional 10×10; conditional one row per digit). For each weight w of
`evaluate.guidance_sweep`, `evaluate.sweep_samples` conditional images at guidance w in
data/samples/sweep/guidance_<w>.npz; for each weight a of `evaluate.autoguidance_sweep`,
as many unconditional images at autoguidance a in data/samples/sweep/autoguidance_<a>.npz:
the evaluate stage's sweeps.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
from ddpm_core import hardware
from ddpm_core.config import Params
from ddpm_core.files import write_atomic
from ddpm_core.generation import (
    autoguidance_samples_path,
    balanced_labels,
    generate,
    load_unet,
    sampler_for,
    save_samples,
    sweep_samples_path,
)
from ddpm_core.seeding import derived_seed, seed_everything
from ddpm_core.viz import class_rows_grid, image_grid

OUT = Path("data/samples")


def save_png(path: Path, grid: np.ndarray) -> None:
    write_atomic(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))


def run(params: Params) -> None:
    sp = params.sample
    seed_everything(params.seed)
    device = hardware.pick_device()
    autocast = hardware.sampling_autocast(device)
    sampler = sampler_for(params.diffusion, sp.model_dump())
    n = params.evaluate.num_samples
    with common.stage_run("sample", params) as run:
        rates = {}
        models, guides = {}, {}
        for kind in ("uncond", "cond"):
            conditional = kind == "cond"
            models[kind] = load_unet(Path("models") / f"{kind}.pt", params.model, conditional, device)
            guides[kind] = load_unet(Path("models") / f"{kind}_guide.pt", params.model, conditional, device)
        weights = {"uncond": sp.autoguidance_uncond, "cond": sp.autoguidance_cond}
        for kind in ("uncond", "cond"):
            conditional = kind == "cond"
            labels = balanced_labels(n) if conditional else None
            generator = torch.Generator().manual_seed(derived_seed(params.seed, f"sample/{kind}"))
            started = time.perf_counter()
            images = generate(
                models[kind], sampler, n, generator, labels,
                sp.guidance if conditional else 1.0, sp.batch_size, device, autocast, desc=f"sample {kind}",
                guide=guides[kind], autoguidance=weights[kind], guidance_interval=sp.guidance_interval,
            )  # fmt: skip
            rates[kind] = n / (time.perf_counter() - started)
            if labels is not None:  # conditional
                save_samples(OUT / "cond.npz", images, labels)
                grid = class_rows_grid(images, labels, per_row=min(10, n // 10))
            else:
                save_samples(OUT / "uncond.npz", images)
                grid = image_grid(images[:100], nrow=10)
            save_png(OUT / f"{kind}.png", grid)
            run.log_image(grid, key=f"samples_{kind}", step=0)
            run.log_parent_image(grid, key=f"samples_{kind}")
            run.log_parent_file(OUT / f"{kind}.png", f"samples_{kind}.png")  # compared side by side
            print(f"sample {kind}: {n} images, {rates[kind]:.1f} images/s")
        run.log_metrics({f"images_per_s_{k}": v for k, v in rates.items()})

        sweep_n = params.evaluate.sweep_samples
        for w in params.evaluate.guidance_sweep:
            labels = balanced_labels(sweep_n)
            generator = torch.Generator().manual_seed(derived_seed(params.seed, f"sample/sweep/{w:g}"))
            images = generate(
                models["cond"], sampler, sweep_n, generator, labels,
                w, sp.batch_size, device, autocast, desc=f"sweep guidance {w:g}",
                guide=guides["cond"], autoguidance=sp.autoguidance_cond, guidance_interval=sp.guidance_interval,
            )  # fmt: skip
            save_samples(sweep_samples_path(OUT, w), images, labels)
        for a in params.evaluate.autoguidance_sweep:
            generator = torch.Generator().manual_seed(derived_seed(params.seed, f"sample/autoguidance/{a:g}"))
            images = generate(
                models["uncond"], sampler, sweep_n, generator, None,
                1.0, sp.batch_size, device, autocast, desc=f"sweep autoguidance {a:g}",
                guide=guides["uncond"], autoguidance=a,
            )  # fmt: skip
            save_samples(autoguidance_samples_path(OUT, a), images)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    common.main(run)
