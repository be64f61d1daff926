"""Score saved samples as the evaluate stage scores its own: both judges, floors, pixels.

    python benchmarks/score.py data/samples/cond.npz data/samples/uncond.npz
    python benchmarks/score.py benchmarks/.cache/samples/*.npz --json >> scores.jsonl
    python benchmarks/score.py images.npz --labels-from data/samples/cond.npz

Takes any .npz written by ddpm_core.generation.save_samples (`images`: uint8 N×28×28,
optional `labels`) and prints, for each file:
  - FID in both judges' feature spaces (models/evaluator.pt, 128-d; models/evaluator_alt.pt,
    256-d) against the real test set, beside each one's floor for N: the FID of the first N
    real training images, as the evaluate stage computes `fid_floor` and `fid_alt_floor`;
  - with labels, the accuracy under both judges (`cond_accuracy`, `cond_accuracy_alt`), and
    always the largest deviation of a predicted class from 10 % (`uncond_max_class_deviation`);
  - the share of exact-zero pixels, beside the first N test images' share, and the
    total-variation distance between the pixel-intensity histograms of the samples and of
    those test images, beside the same distance for N real training images.
The numbers come from ddpm_core.evaluation.SampleScorer, through the same functions as the
stage's: a 1,000-image file scores what `reports/metrics.json` would say of it.
Needs data/dataset and models/ (`dvc repro fetch_data train_evaluator`); runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm_core import hardware  # noqa: E402
from ddpm_core.config import load_params  # noqa: E402
from ddpm_core.data import DATASETS, load_images  # noqa: E402
from ddpm_core.errors import DataError, exit_on_error  # noqa: E402
from ddpm_core.evaluation import JUDGES, SampleScorer, load_judges  # noqa: E402
from ddpm_core.generation import load_samples  # noqa: E402

# What a file that is not the sample stage's should be (benchmarks/score.py judges any).
FORMAT = "give an .npz as ddpm_core.generation.save_samples writes it (`images` uint8 N×28×28, `labels` 0–9)"


def read(path: Path, labels_from: Path | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    images, labels = load_samples(path, remedy=FORMAT)
    if labels_from is not None:
        _, labels = load_samples(labels_from, remedy=FORMAT)
        if labels is None:
            raise DataError(f"{labels_from}: holds no `labels`")
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{labels_from or path}: {len(labels)} labels for {len(images)} images")
    return images, labels


def describe(path: Path, s: dict, files: dict[str, str]) -> str:
    lines = [f"{path}: {s['num_samples']} images" + ("" if "accuracy" in s else ", no labels")]
    for name in JUDGES:
        x = f"_{name}" if name else ""
        acc = f"   accuracy {s[f'accuracy{x}']:.2%}" if f"accuracy{x}" in s else ""
        lines.append(
            f"  {files[name]:<17} FID {s[f'fid{x}']:9.3f}   floor {s[f'fid{x}_floor']:8.3f}   "
            f"{s[f'fid{x}_over_floor']:6.2f}x floor{acc}   max class deviation {s[f'max_class_deviation{x}']:.3f}"
        )
    lines.append(f"  exact-zero pixels  {s['zero_pixels']:.1%}   (real test images {s['zero_pixels_real']:.1%})")
    lines.append(
        f"  pixel-histogram TV {s['pixel_hist_tv']:.4f}   (real training images {s['pixel_hist_tv_floor']:.4f})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", nargs="+", type=Path, help=".npz files of save_samples")
    parser.add_argument(
        "--labels-from", type=Path, help="take `labels` from this .npz instead (the same N, the same order)"
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per file (its path under `file`) instead of text"
    )
    parser.add_argument(
        "--models",
        type=Path,
        default=ROOT / "models",
        help="folder of evaluator.pt and evaluator_alt.pt (default: models/)",
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT / "data" / "dataset", help="the fetch_data output (default: data/dataset)"
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), help="default: data.dataset of params.yaml")
    args = parser.parse_args()

    def body() -> None:
        hardware.configure_threads()
        dataset = args.dataset or load_params(ROOT / "params.yaml").data.dataset
        samples = [(path, *read(path, args.labels_from)) for path in args.samples]  # fail before the slow part
        test = load_images(args.data, dataset, train=False).images
        train = load_images(args.data, dataset, train=True, subset=max(len(images) for _, images, _ in samples)).images
        scorer = SampleScorer(load_judges(args.models), test, train)
        files = {name: file for name, (file, _) in JUDGES.items()}
        for path, images, labels in samples:
            scores = scorer.score(images, labels)
            print(json.dumps({"file": str(path), **scores}) if args.json else describe(path, scores, files), flush=True)

    exit_on_error(body)


if __name__ == "__main__":
    main()
