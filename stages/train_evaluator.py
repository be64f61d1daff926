"""Stage train_evaluator: the two classifiers that judge generated images.

Trains both on the training set of `data.dataset` (MNIST or Fashion-MNIST), each with its
own seed: the VGG-style evaluator (`evaluator` params, models/evaluator.pt, whose 128-d
penultimate layer is the main FID space) and the residual second judge (`evaluator_alt`
params, models/evaluator_alt.pt, 256-d features: the second FID space). Reports their
accuracy on the real test set in reports/evaluator.json. The stage depends only on the
data and those params, so DVC reuses it across experiments.
"""

import argparse
import json
from pathlib import Path

import common
from ddpm_core import hardware
from ddpm_core.config import Params
from ddpm_core.data import dataset_record, load_images
from ddpm_core.evaluation import accuracy, predict, train_classifier
from ddpm_core.files import save_atomic, write_text_atomic


def run(params: Params) -> None:
    device = hardware.pick_device()
    test = load_images(common.DATA, params.data.dataset, train=False)
    summary: dict[str, object] = {}
    with common.stage_run("train_evaluator", params) as run:
        for architecture, ep, out, key in (
            ("vgg", params.evaluator, Path("models/evaluator.pt"), "test_accuracy"),
            ("residual", params.evaluator_alt, Path("models/evaluator_alt.pt"), "alt_test_accuracy"),
        ):
            train = load_images(common.DATA, params.data.dataset, train=True, subset=ep.train_subset)
            run.log_dataset(
                **dataset_record(common.DATA, params.data.dataset, train, True, ep.train_subset), context="training"
            )
            classifier = train_classifier(train, ep.epochs, ep.batch_size, ep.lr, ep.seed, device, architecture)
            test_accuracy, per_class = accuracy(predict(classifier, test.images), test.labels)
            save_atomic({k: v.cpu() for k, v in classifier.state_dict().items()}, out)
            summary[key] = test_accuracy
            summary[f"{key}_per_class"] = {str(k): v for k, v in per_class.items()}
            run.log_metrics({key: test_accuracy, **{f"{key}_class_{k}": v for k, v in per_class.items()}})
            run.log_artifact(out, "checkpoint")
            print(f"train_evaluator: {architecture} judge, test accuracy {test_accuracy:.4f}", flush=True)
        write_text_atomic(Path("reports/evaluator.json"), json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    common.main(run)
