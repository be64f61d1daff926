"""Stage plot: figures and reports/report.md, also logged to the parent MLflow run.

Writes to reports/figures/: loss.png (both models), samples.png (generated grids),
real_vs_generated.png, per_class_accuracy.png, class_fractions.png; a per-class table
reports/per_class.csv for `dvc plots`; and reports/report.md with params, metrics beside
the real-data floor, figures, software versions and git revision.
"""

import argparse
import io
import json
from pathlib import Path

import pandas as pd

import common
from ddpm_core import hardware
from ddpm_core.config import flatten
from ddpm_core.data import load_mnist, to_model_range
from ddpm_core.files import write_atomic, write_text_atomic
from ddpm_core.generation import load_samples
from ddpm_core.report import render_report, software_versions
from ddpm_core.viz import class_rows_grid, grid_figure, image_grid, loss_curves, per_class_bars

REPORTS = Path("reports")
FIGURES = REPORTS / "figures"
MODELS = {"unconditional": "uncond", "conditional": "cond"}


def save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(path, lambda f: f.write(buffer.getvalue()))


def run(params):
    with common.stage_run("plot", params) as run:
        metrics = json.loads((REPORTS / "metrics.json").read_text())
        evaluator = json.loads((REPORTS / "evaluator.json").read_text())
        training = {name: json.loads((REPORTS / f"train_{kind}.json").read_text()) for name, kind in MODELS.items()}
        curves = {name: pd.read_csv(REPORTS / f"loss_{kind}.csv") for name, kind in MODELS.items()}
        uncond, _ = load_samples(Path("data/samples/uncond.npz"))
        cond, labels = load_samples(Path("data/samples/cond.npz"))
        real = load_mnist(Path("data"), train=False)
        per_row = min(10, len(labels) // 10)

        uncond_grid = image_grid(to_model_range(uncond[:100]), nrow=10)
        cond_grid = class_rows_grid(to_model_range(cond), labels, per_row)
        real_grid = class_rows_grid(to_model_range(real.images), real.labels, per_row)
        figures = {
            "Training loss": ("loss.png", loss_curves(curves)),
            "Generated samples": ("samples.png", grid_figure({"unconditional": uncond_grid, "conditional (row = digit)": cond_grid})),
            "Real and generated digits": ("real_vs_generated.png", grid_figure({"real (MNIST test)": real_grid, "generated": cond_grid})),
            "Conditional accuracy per class": (
                "per_class_accuracy.png",
                per_class_bars(metrics["cond_accuracy_per_class"], "Conditional accuracy per class", "accuracy"),
            ),
            "Unconditional samples: predicted class fractions": (
                "class_fractions.png",
                per_class_bars(metrics["uncond_class_fractions"], "Unconditional samples by predicted class", "fraction", reference=0.1),
            ),
        }
        for _, (name, fig) in figures.items():
            save_figure(fig, FIGURES / name)
        rows = [(c, metrics["cond_accuracy_per_class"][c], metrics["uncond_class_fractions"][c]) for c in metrics["cond_accuracy_per_class"]]
        write_text_atomic(REPORTS / "per_class.csv", pd.DataFrame(rows, columns=["class", "accuracy", "uncond_fraction"]).to_csv(index=False))

        environment = {
            **software_versions(),
            "device": str(hardware.pick_device()),
            "threads": str(hardware.configure_threads()),
            "git revision": common.git_revision(),
        }
        report = render_report(
            flatten(params), metrics, evaluator["test_accuracy"], training,
            {caption: f"figures/{name}" for caption, (name, _) in figures.items()}, environment,
        )  # fmt: skip
        write_text_atomic(REPORTS / "report.md", report)
        for _, (name, _) in figures.items():
            run.log_parent_artifact(FIGURES / name, "figures")
        run.log_parent_artifact(REPORTS / "report.md")
        run.set_parent_tags({"git_revision": environment["git revision"]})
    print(f"plot: {len(figures)} figures in {FIGURES}, report in {REPORTS / 'report.md'}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    common.main(run)
