"""Stage evaluate: FID in two judges' feature spaces, conditional accuracy, class spread.

The second judge (models/evaluator_alt.pt, another architecture and seed) gives every
FID a second opinion: `fid_alt_*` beside its own floor, and its own accuracy.

Also the share of exact-zero pixels of both sample sets beside the real test images, and
the total-variation distance between their pixel-intensity histograms (ddpm_core.pixels).
Compares data/samples/uncond.npz and cond.npz with the MNIST test set in the feature
space of models/evaluator.pt (the formula of torchmetrics' FrechetInceptionDistance with
that network as `feature=`; nothing is downloaded), beside the real-data floor: the FID of
`evaluate.num_samples` real training images. With `evaluate.guidance_sweep`, also the
conditional accuracy and FID at each weight (metrics key `guidance_sweep`, beside its
own floor for `evaluate.sweep_samples` images). With `evaluate.autoguidance_sweep`, the
FID in both judges' spaces and the class spread of the unconditional samples at each
autoguidance weight (metrics key `autoguidance_sweep`, beside the same floor). Writes reports/metrics.json (DVC
metrics) and logs every number to the pipeline's parent MLflow run as well.
"""

import argparse
import json
from pathlib import Path

import pandas as pd

import common
from ddpm_core import hardware
from ddpm_core.config import Params
from ddpm_core.data import ImageSet, dataset_record, load_images
from ddpm_core.evaluation import (
    FidelityJudge,
    autoguidance_sweep_rows,
    classification_accuracy_score,
    evaluate_autoguidance_sweep,
    evaluate_guidance_sweep,
    evaluate_samples,
    fidelity_metrics,
    load_classifier,
    memorization,
    sweep_rows,
)
from ddpm_core.files import write_text_atomic
from ddpm_core.generation import (
    autoguidance_samples_path,
    load_labelled_samples,
    load_samples,
    sweep_samples_path,
)
from ddpm_core.pixels import pixel_metrics

SAMPLES = Path("data/samples")
NEAREST = Path("reports/nearest_train.csv")  # the samples nearest a training image: plot draws them


def run(params: Params) -> None:
    device = hardware.pick_device()
    classifier = load_classifier(Path("models/evaluator.pt"), "vgg")
    judge_alt = load_classifier(Path("models/evaluator_alt.pt"), "residual")
    ep = params.evaluate
    test = load_images(common.DATA, params.data.dataset, train=False, subset=ep.test_subset)
    real = load_images(common.DATA, params.data.dataset, train=True, subset=max(ep.num_samples, ep.sweep_samples))
    uncond, _ = load_samples(SAMPLES / "uncond.npz", ep.num_samples)
    cond, cond_labels = load_labelled_samples(SAMPLES / "cond.npz", ep.num_samples)
    sweep = {w: load_labelled_samples(sweep_samples_path(SAMPLES, w), ep.sweep_samples) for w in ep.guidance_sweep}
    autoguided = {
        a: load_samples(autoguidance_samples_path(SAMPLES, a), ep.sweep_samples)[0] for a in ep.autoguidance_sweep
    }
    with common.stage_run("evaluate", params) as run:
        run.log_dataset(
            **dataset_record(common.DATA, params.data.dataset, test, False, ep.test_subset), context="evaluation"
        )
        # One pass over the test set per judge: its features are FID's and KID's reference.
        judges = {"": FidelityJudge(classifier, test.images), "alt": FidelityJudge(judge_alt, test.images)}
        fid, fid_alt = judges[""], judges["alt"]
        metrics = evaluate_samples(
            classifier, fid, real.images[: ep.num_samples],
            uncond, cond, cond_labels,
        )  # fmt: skip
        metrics.update(
            evaluate_samples(judge_alt, fid_alt, real.images[: ep.num_samples], uncond, cond, cond_labels, judge="alt")
        )
        metrics.update(pixel_metrics(uncond, cond, test.images[: ep.num_samples]))
        metrics.update(
            fidelity_metrics(
                judges, real.images[: ep.num_samples], {"uncond": (uncond, None), "cond": (cond, cond_labels)}
            )
        )
        training = load_images(common.DATA, params.data.dataset, train=True, subset=params.data.train_subset)
        copied, closest = memorization(test.images, training.images, {"uncond": uncond, "cond": cond}, ep.num_samples)
        metrics.update(copied)
        write_text_atomic(NEAREST, pd.DataFrame(closest).to_csv(index=False))
        if ep.cas_samples:
            n, ev = ep.cas_samples, params.evaluator
            generated = ImageSet(cond[:n], cond_labels[:n])
            real_n = ImageSet(real.images[:n], real.labels[:n])
            metrics.update(
                classification_accuracy_score(
                    generated, real_n, test, ep.cas_epochs, ev.batch_size, ev.lr, ev.seed, device
                )
            )
        if sweep:
            metrics["guidance_sweep"] = evaluate_guidance_sweep(
                classifier, fid, real.images, sweep, fid_alt, intervals=(judges, 0)
            )
        if autoguided:
            metrics["autoguidance_sweep"] = evaluate_autoguidance_sweep(
                classifier, fid, real.images, autoguided, fid_alt, intervals=(judges, 0)
            )
        write_text_atomic(Path("reports/metrics.json"), json.dumps(metrics, indent=2) + "\n")
        # Each model's own numbers are linked to its logged model (its MLflow page lists
        # them); the rest, and all of them on the parent run, as plain run metrics.
        linked: set[str] = set()
        for kind in ("uncond", "cond"):
            model_id = run.logged_model_of(Path("models") / f"{kind}.pt")
            if model_id is not None:
                own = {k: v for k, v in metrics.items() if kind in k.split("_")}
                run.log_model_metrics(model_id, own)
                linked |= own.keys()
        run.log_metrics({k: v for k, v in metrics.items() if k not in linked})
        run.log_parent_metrics(metrics)
    print(
        f"evaluate: FID uncond {metrics['fid_uncond']:.2f}, cond {metrics['fid_cond']:.2f} "
        f"(real floor {metrics['fid_floor']:.2f}); conditional accuracy {metrics['cond_accuracy']:.4f}"
    )
    print(
        f"evaluate: second judge: FID uncond {metrics['fid_alt_uncond']:.2f}, cond {metrics['fid_alt_cond']:.2f} "
        f"(real floor {metrics['fid_alt_floor']:.2f}); conditional accuracy {metrics['cond_accuracy_alt']:.4f}"
    )
    for kind in ("cond", "uncond"):
        print(
            f"evaluate: {kind}: KID {metrics[f'kid_{kind}']:.4f} (real {metrics['kid_floor']:.4f}), "
            f"precision {metrics[f'precision_{kind}']:.3f}, recall {metrics[f'recall_{kind}']:.3f} "
            f"(real {metrics['precision_floor']:.3f}, {metrics['recall_floor']:.3f}), "
            f"memorized {metrics[f'memorized_{kind}']:.1%}; FID 95 % interval "
            f"[{metrics[f'fid_{kind}_ci95']['low']:.2f}, {metrics[f'fid_{kind}_ci95']['high']:.2f}]"
        )
    if ep.cas_samples:
        print(
            f"evaluate: CAS (a classifier trained on {ep.cas_samples} generated digits, tested on real ones) "
            f"{metrics['cas_accuracy']:.4f}; trained on as many real digits {metrics['cas_accuracy_real']:.4f}"
        )
    print(
        f"evaluate: exact-zero pixels uncond {metrics['zero_pixels_uncond']:.1%}, cond {metrics['zero_pixels_cond']:.1%} "
        f"(real {metrics['zero_pixels_real']:.1%}); histogram TV uncond {metrics['pixel_hist_tv_uncond']:.3f}, "
        f"cond {metrics['pixel_hist_tv_cond']:.3f}"
    )
    for row in sweep_rows(metrics):
        print(f"evaluate: guidance {row['guidance']:g}: accuracy {row['cond_accuracy']:.4f}, FID {row['fid']:.2f}")
    for row in autoguidance_sweep_rows(metrics):
        floors = metrics["autoguidance_sweep"]
        print(
            f"evaluate: autoguidance {row['autoguidance']:g} (unconditional): "
            f"FID {row['fid']:.2f} ({row['fid'] / floors['fid_floor']:.2f}× floor), "
            f"second judge {row['fid_alt']:.2f} ({row['fid_alt'] / floors['fid_alt_floor']:.2f}× floor); "
            f"largest class deviation {100 * row['max_class_deviation']:.1f} points"
        )


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    common.main(run)
