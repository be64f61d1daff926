"""What a stage run records in MLflow beside its metrics: input datasets, system metrics,
logged and registered models. Against a real SQLite store in a temporary folder."""

import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from ddpm_core import tracking
from ddpm_core.data import ImageSet, dataset_record, load_images


def store(root):
    client = MlflowClient(tracking.tracking_uri(root))
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    return client, experiment.experiment_id


def test_a_dataset_digest_follows_the_content():
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    labels = torch.arange(4)
    same = ImageSet(images.clone(), labels.clone())
    assert ImageSet(images, labels).digest() == same.digest()
    assert ImageSet(images, labels.flip(0)).digest() != same.digest()
    other = images.clone()
    other[3, 0, 27, 27] = 1
    assert ImageSet(other, labels).digest() != same.digest()


def test_datasets_are_inputs_of_the_stage_run_and_of_its_parent(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    train = load_images(mnist_root, "mnist", train=True, subset=500)
    test = load_images(mnist_root, "mnist", train=False)
    with tracking.stage_run(tmp_path, "p1", "p1", "train_uncond", {}, {}) as run:
        run.log_dataset(**dataset_record(mnist_root, "mnist", train, True, 500), context="training")
    with tracking.stage_run(tmp_path, "p1", "p1", "train_cond", {}, {}) as run:
        run.log_dataset(**dataset_record(mnist_root, "mnist", train, True, 500), context="training")  # the same again
    with tracking.stage_run(tmp_path, "p1", "p1", "evaluate", {}, {}) as evaluate:
        evaluate.log_dataset(**dataset_record(mnist_root, "mnist", test, False, None), context="evaluation")
    client, _ = store(tmp_path)

    def inputs(run_id):
        return sorted((d.dataset.name, d.dataset.digest, d.tags[0].value) for d in client.get_run(run_id).inputs.dataset_inputs)

    assert inputs(run.run_id) == [("mnist-train[:500]", train.digest(), "training")]
    assert inputs(evaluate.run_id) == [("mnist-test", test.digest(), "evaluation")]
    assert inputs(run.parent_id) == sorted([("mnist-train[:500]", train.digest(), "training"), ("mnist-test", test.digest(), "evaluation")])
    (first,) = client.get_run(run.run_id).inputs.dataset_inputs
    assert '"num_images": 500' in first.dataset.profile and '"split": "train"' in first.dataset.profile


@pytest.mark.parametrize("enabled", [True, False])
def test_system_metrics_are_logged_unless_switched_off(tmp_path, monkeypatch, enabled):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true" if enabled else "false")
    with tracking.stage_run(tmp_path, "p", "p", "sample", {}, {}) as run:
        time.sleep(1.5)
    client, _ = store(tmp_path)
    keys = set(client.get_run(run.run_id).data.metrics)
    system = {k for k in keys if k.startswith("system/")}
    if enabled:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, keys
        assert len(client.get_metric_history(run.run_id, "system/cpu_utilization_percentage")) >= 2
    else:
        assert system == set()
