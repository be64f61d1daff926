"""One point of the defaults sweep: train with some params changed, then score samples.

    python benchmarks/sweep.py epochs=1 'model.channels=[16,32,64]' --sample dpmpp2m:10:3 ddim:20:3
    python benchmarks/sweep.py epochs=1 --models cond uncond --sample dpmpp2m:10:3

Takes params.yaml, applies the `key=value` overrides (YAML values, dotted keys as in
`dvc exp run -S`), trains the models named by --models (the conditional one by
default) on the MNIST in data/ (`dvc repro fetch_data train_evaluator` puts it and the
evaluator there), then draws `evaluate.num_samples` images per `sampler:steps:guidance`
and scores them with models/evaluator.pt and models/evaluator_alt.pt (FID in both judges'
spaces, each beside its floor) as the evaluate stage does. Prints one
row per sampler setting and appends it to benchmarks/sweep.csv. Trained weights are kept
in benchmarks/.cache/, so scoring more sampler settings of the same training setting
does not train again. Wall times are those of this process: keep the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).with_name(".cache")
sys.path.insert(0, str(ROOT))

from ddpm_core import hardware  # noqa: E402
from ddpm_core.config import parse_params  # noqa: E402
from ddpm_core.data import NUM_CLASSES, load_images  # noqa: E402
from ddpm_core.evaluation import FeatureFID, accuracy, load_classifier, predict  # noqa: E402
from ddpm_core.files import load_safe, save_atomic  # noqa: E402
from ddpm_core.generation import balanced_labels, generate, save_samples  # noqa: E402
from ddpm_core.samplers import make_sampler  # noqa: E402
from ddpm_core.schedule import make_schedule  # noqa: E402
from ddpm_core.train import train_diffusion  # noqa: E402
from ddpm_core.unet import build_unet  # noqa: E402


def override(raw: dict, assignment: str) -> str:
    key, _, value = assignment.partition("=")
    *path, leaf = key.split(".")
    node = raw
    for part in path:
        node = node[part]
    node[leaf] = yaml.safe_load(value)
    return f"{key}={value}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value, as with dvc exp run -S")
    parser.add_argument(
        "--sample",
        nargs="+",
        default=["dpmpp2m:10:3"],
        help="sampler:steps:guidance[:t_min] settings to score (t_min: params.yaml's if left out, null = trailing)",
    )
    parser.add_argument(
        "--models", nargs="+", choices=["cond", "uncond"], default=["cond"], help="which models to train and score"
    )
    args = parser.parse_args()

    hardware.configure_threads()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    setting = " ".join(override(raw, a) for a in args.overrides) or "defaults"
    params = parse_params(raw)
    device = hardware.pick_device()
    data_dir, dataset = ROOT / "data" / "dataset", params.data.dataset
    train = load_images(data_dir, dataset, train=True, subset=params.data.train_subset)
    classifier = load_classifier(ROOT / "models/evaluator.pt", "vgg")
    judge_alt = load_classifier(ROOT / "models/evaluator_alt.pt", "residual")
    test_images = load_images(data_dir, dataset, train=False).images
    fid, fid_alt = FeatureFID(classifier, test_images), FeatureFID(judge_alt, test_images)
    n = params.evaluate.num_samples
    real = load_images(data_dir, dataset, train=True, subset=n).images
    floor, floor_alt = fid.score(real), fid_alt.score(real)
    schedule = make_schedule(params.diffusion.schedule, params.diffusion.timesteps)
    autocast = hardware.sampling_autocast(device)

    rows = []
    for kind in args.models:
        conditional = kind == "cond"
        cached = (
            CACHE
            / f"{hashlib.sha256(json.dumps([kind, params.model_dump()], sort_keys=True).encode()).hexdigest()[:16]}.pt"
        )
        if not cached.exists():
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                result = train_diffusion(
                    train, params, conditional, Path(tmp) / "resume.pt", name=f"train_{kind}", device=device
                )
            trained = {"weights": result.ema_state_dict, "train_s": time.perf_counter() - started,
                       "images_per_s": result.images_per_s[-1], "final_loss": result.losses[-1]}  # fmt: skip
            CACHE.mkdir(exist_ok=True)
            save_atomic(trained, cached)
        trained = load_safe(cached)
        model = build_unet(params.model, NUM_CLASSES if conditional else None)
        model.load_state_dict(trained["weights"])
        model = hardware.place_model(model, device, hardware.sampling_precision(device)).eval().requires_grad_(False)
        for spec in args.sample:
            name, steps, guidance, *last = spec.split(":")  # an optional 4th field overrides sample.t_min
            t_min = yaml.safe_load(last[0]) if last else params.sample.t_min
            labels = balanced_labels(n) if conditional else None
            started = time.perf_counter()
            images = generate(
                model, make_sampler(name, schedule, int(steps), 0.0, params.diffusion.prediction, offset_noise=params.diffusion.offset_noise, t_min=t_min), n, torch.Generator().manual_seed(params.seed), labels,
                float(guidance) if conditional else 1.0, params.sample.batch_size, device, autocast, desc=f"{kind} {spec}",
            )  # fmt: skip
            sample_s = time.perf_counter() - started
            samples_dir = CACHE / "samples"
            samples_dir.mkdir(parents=True, exist_ok=True)
            save_samples(samples_dir / f"{cached.stem}_{spec.replace(':', '_')}.npz", images, labels)
            score, score_alt = fid.score(images), fid_alt.score(images)
            row = {
                "setting": setting, "model": kind, "sampler": spec, "train_s": round(trained["train_s"]), "train_img_s": round(trained["images_per_s"]),
                "last_epoch_loss": round(trained["final_loss"], 4), "sample_img_s": round(n / sample_s, 1),
                "fid": round(score, 2), "floor": round(floor, 2), "fid_over_floor": round(score / floor, 2),
                "fid_alt": round(score_alt, 2), "floor_alt": round(floor_alt, 2), "fid_alt_over_floor": round(score_alt / floor_alt, 2),
                "zero_pixels": round((images == 0).float().mean().item(), 3), "samples": f"{cached.stem}_{spec.replace(':', '_')}.npz",
                "accuracy": round(accuracy(predict(classifier, images), labels)[0], 4) if labels is not None else None,
            }  # fmt: skip
            rows.append(row)
            print(row, flush=True)

    import pandas as pd

    table = pd.DataFrame(rows)
    out = Path(__file__).with_name("sweep.csv")
    table.to_csv(out, mode="a", header=not out.exists(), index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
