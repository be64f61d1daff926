"""Stage plot: figures and reports/report.md, also logged to the parent MLflow run.

Writes to reports/figures/: loss.png (both models), samples.png (generated grids),
real_vs_generated.png, per_class_accuracy.png, class_fractions.png, nearest_training.png
(the ten generated digits nearest a training image, each above it), guidance_sweep.png
(when evaluate.guidance_sweep is set; its table in reports/guidance_sweep.csv),
autoguidance_sweep.png (when evaluate.autoguidance_sweep is set: the unconditional model's
FID over the floor of both judges and its class spread against the autoguidance weight;
its table in reports/autoguidance_sweep.csv), and denoising.gif (the conditional model
drawing four of each digit, from noise to digits, with the `sample` params' sampler,
steps, guidance and autoguidance by models/cond_guide.pt); a per-class table
reports/per_class.csv for `dvc plots`; and reports/report.md with params, metrics beside
the real-data floor, figures, software versions and git revision.
"""

import argparse
import io
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure

import common
from ddpm_core import hardware
from ddpm_core.animation import denoising_gif
from ddpm_core.config import Params, flatten
from ddpm_core.data import DATASETS, NUM_CLASSES, load_images, to_model_range
from ddpm_core.evaluation import autoguidance_sweep_rows, sweep_rows
from ddpm_core.files import read_json, read_table, write_atomic, write_text_atomic
from ddpm_core.generation import load_labelled_samples, load_samples, load_unet, sampler_for
from ddpm_core.prompts import class_labels
from ddpm_core.report import render_report
from ddpm_core.seeding import derived_seed, seed_everything
from ddpm_core.train import CURVE_COLUMNS
from ddpm_core.viz import (
    autoguidance_sweep_figure,
    class_rows_grid,
    grid_figure,
    guidance_sweep_figure,
    image_grid,
    loss_curves,
    nearest_pairs_figure,
    per_class_bars,
)

REPORTS = Path("reports")
FIGURES = REPORTS / "figures"
MODELS = {"unconditional": "uncond", "conditional": "cond"}
NEAREST = REPORTS / "nearest_train.csv"  # the evaluate stage's
NEAREST_COLUMNS = ("model", "sample", "train_index", "distance")
ANIMATION = "denoising.gif"
ANIMATION_COLUMNS = 4  # per digit: 40 images at the configured steps take seconds


def save_figure(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(path, lambda f: f.write(buffer.getvalue()))


def denoising_animation(params: Params, path: Path) -> None:
    """The conditional model drawing ANIMATION_COLUMNS of each digit, one row per digit,
    with the sample stage's sampler: guidance `sample.guidance` and autoguidance by its
    guide (models/cond_guide.pt) at `sample.autoguidance_cond`."""
    sp = params.sample
    seed_everything(params.seed)
    device = hardware.pick_device()
    autocast = hardware.sampling_autocast(device)
    model = load_unet(Path("models/cond.pt"), params.model, True, device)
    guide = load_unet(Path("models/cond_guide.pt"), params.model, True, device)
    sampler = sampler_for(params.diffusion, sp.model_dump())
    labels = torch.arange(NUM_CLASSES).repeat_interleave(ANIMATION_COLUMNS)
    generator = torch.Generator().manual_seed(derived_seed(params.seed, "plot/denoising"))
    denoising_gif(
        path, model, sampler, labels, ANIMATION_COLUMNS, generator, sp.guidance, device, autocast,
        guide=guide, autoguidance=sp.autoguidance_cond,
    )  # fmt: skip


def run(params: Params) -> None:
    with common.stage_run("plot", params) as run:
        again = "run `dvc repro --force -s {}`".format
        metrics = read_json(REPORTS / "metrics.json", again("evaluate"))
        evaluator = read_json(REPORTS / "evaluator.json", again("train_evaluator"))
        training: dict[str, dict] = {
            name: read_json(REPORTS / f"train_{kind}.json", again(f"train_{kind}")) for name, kind in MODELS.items()
        }
        curves = {
            name: read_table(REPORTS / f"loss_{kind}.csv", CURVE_COLUMNS, again(f"train_{kind}"))
            for name, kind in MODELS.items()
        }
        uncond, _ = load_samples(Path("data/samples/uncond.npz"), params.evaluate.num_samples)
        cond, labels = load_labelled_samples(Path("data/samples/cond.npz"), params.evaluate.num_samples)
        real = load_images(common.DATA, params.data.dataset, train=False)
        per_row = min(10, len(labels) // 10)
        names = class_labels(params.data.dataset)  # digits for MNIST, "sneaker", "bag", … for Fashion-MNIST
        real_title = f"real ({DATASETS[params.data.dataset].title} test)"

        def named(per_class: dict[str, float]) -> dict[str, float]:
            return {names[int(c)]: v for c, v in per_class.items()}

        uncond_grid = image_grid(to_model_range(uncond[:100]), nrow=10)
        cond_grid = class_rows_grid(to_model_range(cond), labels, per_row)
        real_grid = class_rows_grid(to_model_range(real.images), real.labels, per_row)
        figures = {
            "Training loss": ("loss.png", loss_curves(curves)),
            "Generated samples": (
                "samples.png",
                grid_figure(
                    {"unconditional": uncond_grid, "conditional": cond_grid}, row_labels={"conditional": names}
                ),
            ),
            "Real and generated digits": (
                "real_vs_generated.png",
                grid_figure(
                    {real_title: real_grid, "generated": cond_grid}, row_labels={real_title: names, "generated": names}
                ),
            ),
            "Conditional accuracy per class": (
                "per_class_accuracy.png",
                per_class_bars(named(metrics["cond_accuracy_per_class"]), "Conditional accuracy per class", "accuracy"),
            ),
            "Unconditional samples: predicted class fractions": (
                "class_fractions.png",
                per_class_bars(
                    named(metrics["uncond_class_fractions"]),
                    "Unconditional samples by predicted class",
                    "fraction",
                    reference=0.1,
                ),
            ),
        }
        train_set = load_images(common.DATA, params.data.dataset, train=True, subset=params.data.train_subset)
        samples = {"uncond": uncond, "cond": cond}
        pairs = [
            (samples[r["model"]][r["sample"], 0].numpy(), train_set.images[r["train_index"], 0].numpy(), f"{r['model']} {r['distance']:.0f}")
            for r in read_table(NEAREST, NEAREST_COLUMNS, again("evaluate")).to_dict("records")
        ]  # fmt: skip
        figures["Generated digits nearest a training image (pixel L2 distance under each)"] = (
            "nearest_training.png",
            nearest_pairs_figure(pairs),
        )
        sweep = sweep_rows(metrics)
        if sweep:
            floor, n = metrics["guidance_sweep"]["fid_floor"], metrics["guidance_sweep"]["num_samples"]
            figures["Guidance sweep: conditional accuracy and FID against the guidance weight"] = (
                "guidance_sweep.png",
                guidance_sweep_figure(sweep, floor, n),
            )
        autoguided = autoguidance_sweep_rows(metrics)
        if autoguided:
            ag = metrics["autoguidance_sweep"]
            figures["Autoguidance sweep: unconditional FID over the floor and class deviation against the weight"] = (
                "autoguidance_sweep.png",
                autoguidance_sweep_figure(autoguided, ag["fid_floor"], ag["num_samples"], ag.get("fid_alt_floor")),
            )
        images = {caption: name for caption, (name, _) in figures.items()}
        images["Denoising: the conditional model from noise to digits (row = digit)"] = ANIMATION
        rows = [
            (names[int(c)], metrics["cond_accuracy_per_class"][c], metrics["uncond_class_fractions"][c])
            for c in metrics["cond_accuracy_per_class"]
        ]
        tables = {
            "per_class.csv": pd.DataFrame(rows, columns=["class", "accuracy", "uncond_fraction"]),
            # An empty sweep still writes the header: the file is a DVC output.
            "guidance_sweep.csv": pd.DataFrame(sweep, columns=["guidance", "cond_accuracy", "fid"]),
            "autoguidance_sweep.csv": pd.DataFrame(
                autoguided, columns=["autoguidance", "fid", "fid_alt", "max_class_deviation"]
            ),
        }
        environment = common.run_environment()
        report = render_report(
            flatten(params), metrics, evaluator["test_accuracy"], training,
            {caption: f"figures/{name}" for caption, name in images.items()}, environment,
        )  # fmt: skip
        # Everything read and composed: only now does the stage write (a broken report of
        # another stage above leaves every output as it was).
        denoising_animation(params, FIGURES / ANIMATION)
        for _, (name, fig) in figures.items():
            save_figure(fig, FIGURES / name)
        for name, table in tables.items():
            write_text_atomic(REPORTS / name, table.to_csv(index=False))
        write_text_atomic(REPORTS / "report.md", report)
        for name in images.values():
            run.log_parent_artifact(FIGURES / name, "figures")
        run.log_parent_artifact(REPORTS / "report.md")
    print(f"plot: {len(images)} figures in {FIGURES}, report in {REPORTS / 'report.md'}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    common.main(run)
