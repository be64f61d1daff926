"""Autoguidance candidates: which guide, at which weight, judged on two seeds.

    python benchmarks/autoguidance.py --models uncond --guide-at 0.0625 0.125 0.25 --weights 1 1.5 2 --seeds 0 1
    python benchmarks/autoguidance.py --models cond --guide-at 0.125 --weights 1 1.5 2 --cfg 1 1.5 2.5
    python benchmarks/autoguidance.py train.cond_share=0.25 --models cond --guide-at 0.125 --weights 2 --cfg 1.5
    python benchmarks/autoguidance.py epochs=8 --from-models ../long8/models --weights 1 1.5 --steps 10 20 --seeds 0 1

Takes params.yaml with the `key=value` overrides (as `dvc exp run -S`), trains each model
of --models once with the pipeline's own `train_diffusion`, keeping the EMA weights at
every fraction of --guide-at of its training steps (a guide costs no extra training: it is
a snapshot of the same run), then for every seed, guide, autoguidance weight and (for the
conditional model) CFG weight draws `evaluate.num_samples` images with the default sampler
and scores them as the evaluate stage does (`SampleScorer`: FID × floor in both judges'
spaces, class spread, accuracy, exact-zero pixels) plus precision/recall (k = 3) in both
spaces. Weight 1 is the model alone (no guide). `--from-models DIR` takes the models a
pipeline run trained instead (DIR/<kind>.pt and <kind>_guide.pt, the guide at the run's
train.guide_at; give the run's overrides too, `epochs=8`); `--steps` varies the sampler's
steps. Prints a row per setting and appends it to
benchmarks/autoguidance.csv; trained weights are cached in benchmarks/.cache/. Needs
data/dataset and the judges (`dvc repro fetch_data train_evaluator`). Keep the machine
otherwise idle: the minutes are this process's.
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

from sweep import override  # noqa: E402

from ddpm_core import fidelity, hardware  # noqa: E402
from ddpm_core.config import Params, parse_params  # noqa: E402
from ddpm_core.data import NUM_CLASSES, ImageSet, load_images  # noqa: E402
from ddpm_core.evaluation import SampleScorer, judge_features, load_judges  # noqa: E402
from ddpm_core.files import load_safe, save_atomic  # noqa: E402
from ddpm_core.generation import balanced_labels, generate, sampler_for  # noqa: E402
from ddpm_core.samplers import guided_timesteps  # noqa: E402
from ddpm_core.seeding import derived_seed  # noqa: E402
from ddpm_core.train import TrainingPlan, train_diffusion  # noqa: E402
from ddpm_core.unet import UNet, build_unet  # noqa: E402


def trained(params: Params, kind: str, fractions: list[float], data: ImageSet, device: torch.device) -> dict:
    """{"weights", "snapshots": {fraction: weights}, "train_s", "images_per_s"}, cached."""
    conditional = kind == "cond"
    plan = TrainingPlan.of(len(data), params, conditional)
    steps = {f: min(plan.total_steps, max(1, round(f * plan.total_steps))) for f in fractions}
    key = json.dumps([kind, params.model_dump(exclude={"sample", "evaluate"})], sort_keys=True)
    base = CACHE / f"ag_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    cached = load_safe(base) if base.exists() else None
    if cached is None or not set(steps.values()) <= set(cached["snapshots"]):
        wanted = tuple(sorted(set(steps.values()) | set(cached["snapshots"] if cached else ())))
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = train_diffusion(
                data,
                params,
                conditional,
                Path(tmp) / "r.pt",
                name=f"train_{kind}",
                device=device,
                snapshot_steps=wanted,
            )
        cached = {
            "weights": result.ema_state_dict,
            "snapshots": result.snapshots,
            "train_s": time.perf_counter() - started,
            "images_per_s": sum(result.images_per_s) / len(result.images_per_s),
        }
        CACHE.mkdir(exist_ok=True)
        save_atomic(cached, base)
    cached["by_fraction"] = {f: cached["snapshots"][s] for f, s in steps.items()}
    cached["steps"] = steps
    return cached


def from_pipeline(params: Params, kind: str, models: Path) -> dict:
    """`trained`'s dict for the models a pipeline run left in `models` (its guide is the one
    snapshot, at train.guide_at; the minutes from the run's reports/train_<kind>.json)."""
    fraction = params.train.guide_at
    record = json.loads((models.parent / "reports" / f"train_{kind}.json").read_text())
    return {
        "weights": load_safe(models / f"{kind}.pt"),
        "by_fraction": {fraction: load_safe(models / f"{kind}_guide.pt")},
        "steps": {fraction: record["guide_step"]},
        "train_s": record["train_seconds"],
        "images_per_s": record["images_per_s"],
    }


def network(params: Params, weights: dict, conditional: bool, device: torch.device) -> UNet:
    model = build_unet(params.model, NUM_CLASSES if conditional else None)
    model.load_state_dict(weights)
    return hardware.place_model(model, device, hardware.sampling_precision(device)).eval().requires_grad_(False)


def interval(text: str) -> tuple[int, int] | None:
    """Parse `LO:HI` → (LO, HI); `all` → None (CFG at every step)."""
    if text == "all":
        return None
    lo, hi = text.split(":")
    return int(lo), int(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value, as with dvc exp run -S")
    parser.add_argument("--models", nargs="+", choices=["uncond", "cond"], default=["uncond"])
    parser.add_argument("--guide-at", nargs="+", type=float, default=[0.125], help="fractions of training")
    parser.add_argument("--weights", nargs="+", type=float, default=[1.0, 1.5, 2.0], help="autoguidance weights")
    parser.add_argument("--cfg", nargs="+", type=float, default=None, help="CFG weights (default: sample.guidance)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--intervals", nargs="+", type=interval, default=[None], metavar="LO:HI",
                        help="timesteps CFG applies at (sample.guidance_interval), `all` for every step")  # fmt: skip
    parser.add_argument("--steps", nargs="+", type=int, default=None, help="sampler steps (default: sample.steps)")
    parser.add_argument("--from-models", type=Path, metavar="DIR",
                        help="a pipeline run's models/ (its <kind>.pt and <kind>_guide.pt) instead of training")  # fmt: skip
    args = parser.parse_args()

    hardware.configure_threads()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for assignment in args.overrides:
        override(raw, assignment)
    setting = " ".join(args.overrides) or "defaults"
    params = parse_params(raw)
    device = hardware.pick_device()
    data_dir = ROOT / "data" / "dataset"
    data = load_images(data_dir, params.data.dataset, train=True, subset=params.data.train_subset)
    test = load_images(data_dir, params.data.dataset, train=False).images
    n = params.evaluate.num_samples
    judges = load_judges(ROOT / "models")
    scorer = SampleScorer(judges, test, data.images[:n] if params.data.train_subset is None else
                          load_images(data_dir, params.data.dataset, train=True, subset=n).images)  # fmt: skip
    real_features = {name: judge_features(j, test[:n]) for name, j in judges.items()}
    samplers = {
        k: sampler_for(params.diffusion, params.sample.model_dump(), k) for k in args.steps or [params.sample.steps]
    }
    if args.from_models:
        args.guide_at = [params.train.guide_at]
    autocast = hardware.sampling_autocast(device)

    rows = []
    for kind in args.models:
        conditional = kind == "cond"
        run = (
            from_pipeline(params, kind, args.from_models)
            if args.from_models
            else trained(params, kind, args.guide_at, data, device)
        )
        model = network(params, run["weights"], conditional, device)
        cfgs = (args.cfg or [params.sample.guidance]) if conditional else [1.0]
        for seed in args.seeds:
            for fraction in args.guide_at:
                guide = network(params, run["by_fraction"][fraction], conditional, device)
                for w in args.weights:
                    if w == 1 and fraction != args.guide_at[0]:
                        continue  # the model alone: one row per seed and CFG weight is enough
                    spans = args.intervals if conditional else [None]
                    for cfg, span, (steps, sampler) in [
                        (c, i, k) for c in cfgs for i in spans for k in samplers.items()
                    ]:
                        labels = balanced_labels(n) if conditional else None
                        generator = torch.Generator().manual_seed(derived_seed(seed, f"sample/{kind}"))
                        started = time.perf_counter()
                        images = generate(
                            model, sampler, n, generator, labels, cfg, params.sample.batch_size, device, autocast,
                            desc=f"{kind} guide@{fraction:g} w{w:g} cfg{cfg:g} {steps} steps seed{seed}", guide=guide, autoguidance=w,
                            guidance_interval=span,
                        )  # fmt: skip
                        seconds = time.perf_counter() - started
                        s = scorer.score(images, labels)
                        row = {
                            "setting": setting, "model": kind, "seed": seed, "guide_at": fraction,
                            "guide_step": run["steps"][fraction], "autoguidance": w, "cfg": cfg if conditional else None,
                            "steps": steps, "models": str(args.from_models or "trained here"),
                            "cfg_interval": "all" if span is None else f"{span[0]}:{span[1]}",
                            "cfg_steps": len(guided_timesteps(sampler.timesteps.tolist(), span)),
                            "train_s": round(run["train_s"]), "train_img_s": round(run["images_per_s"]),
                            "sample_img_s": round(n / seconds, 1),
                            "fid_x_floor": round(s["fid_over_floor"], 2), "fid_alt_x_floor": round(s["fid_alt_over_floor"], 2),
                            "class_dev_pts": round(100 * s["max_class_deviation"], 1),
                            "class_dev_alt_pts": round(100 * s["max_class_deviation_alt"], 1),
                            "accuracy": round(s["accuracy"], 4) if conditional else None,
                            "zero_pixels": round(s["zero_pixels"], 3),
                        }  # fmt: skip
                        for name, judge in judges.items():
                            fake = judge_features(judge, images)
                            p, r = fidelity.precision_recall(real_features[name], fake, 3)
                            suffix = f"_{name}" if name else ""
                            row[f"precision{suffix}"] = round(p.double().mean().item(), 3)
                            row[f"recall{suffix}"] = round(r.double().mean().item(), 3)
                        rows.append(row)
                        print(json.dumps(row), flush=True)

    import pandas as pd

    table = pd.DataFrame(rows)
    out = Path(__file__).with_name("autoguidance.csv")
    kept = pd.read_csv(out) if out.exists() else None  # rows of older runs may lack newer columns
    joined = table if kept is None else pd.concat([kept, table], ignore_index=True)
    joined.convert_dtypes().to_csv(out, index=False)  # integer columns stay integers beside older rows' blanks
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
