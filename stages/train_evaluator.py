"""Stage train_evaluator: the classifier that judges generated images.

Trains on the training set of `data.dataset` (MNIST or Fashion-MNIST) with its own seed (`evaluator.seed`), reports its
accuracy on the real test set, and writes models/evaluator.pt (a state_dict) and
reports/evaluator.json. Its 128-d penultimate layer is the feature space of FID. It
depends only on the data and the `evaluator` params, so DVC reuses it across experiments.
"""

import argparse
import json
from pathlib import Path

import common
from ddpm_core import hardware
from ddpm_core.data import load_images
from ddpm_core.evaluation import accuracy, predict, train_classifier
from ddpm_core.files import save_atomic, write_text_atomic


def run(params):
    ep = params.evaluator
    device = hardware.pick_device()
    train = load_images(common.DATA, params.data.dataset, train=True, subset=ep.train_subset)
    test = load_images(common.DATA, params.data.dataset, train=False)
    with common.stage_run("train_evaluator", params) as run:
        classifier = train_classifier(train, ep.epochs, ep.batch_size, ep.lr, ep.seed, device)
        test_accuracy, per_class = accuracy(predict(classifier, test.images), test.labels)
        save_atomic({k: v.cpu() for k, v in classifier.state_dict().items()}, Path("models/evaluator.pt"))
        summary = {"test_accuracy": test_accuracy, "test_accuracy_per_class": {str(k): v for k, v in per_class.items()}}
        write_text_atomic(Path("reports/evaluator.json"), json.dumps(summary, indent=2) + "\n")
        run.log_metrics({"test_accuracy": test_accuracy, **{f"test_accuracy_class_{k}": v for k, v in per_class.items()}})
        run.log_artifact(Path("models/evaluator.pt"), "checkpoint")
    print(f"train_evaluator: test accuracy {test_accuracy:.4f}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    common.main(run)
