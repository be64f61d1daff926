"""End to end: the real `dvc repro` in a fresh repository, with tiny params, checked from
its outputs and from the MLflow store itself. Experiments (`dvc exp run`, queued and
temporary) are in test_reproducibility.py."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import MIRROR, TINY_PIPELINE, run, tiny_raw
from ddpm_core.data import load_images
from ddpm_core.environment import sha256_file
from ddpm_core.tracking import EXPERIMENT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no MNIST mirror at {MIRROR}")]

STAGES = ["fetch_data", "train_uncond", "train_cond", "train_evaluator", "sample", "evaluate", "plot"]
METRICS = {
    "num_samples", "fid_floor", "fid_uncond", "fid_cond", "fid_uncond_over_floor", "fid_cond_over_floor",
    "cond_accuracy", "cond_accuracy_per_class", "uncond_class_fractions", "uncond_max_class_deviation",
    "guidance_sweep", "autoguidance_sweep",
    "fid_alt_floor", "fid_alt_uncond", "fid_alt_cond", "fid_alt_uncond_over_floor", "fid_alt_cond_over_floor",
    "cond_accuracy_alt", "uncond_max_class_deviation_alt",
    "zero_pixels_uncond", "zero_pixels_cond", "zero_pixels_real", "pixel_hist_tv_uncond", "pixel_hist_tv_cond",
    # issue 17: KID, precision/recall in both judges' spaces, memorization, and 95 % intervals
    "kid_floor", "kid_alt_floor", "precision_floor", "recall_floor", "precision_alt_floor", "recall_alt_floor",
    "memorization_threshold", "cond_accuracy_ci95", "cond_accuracy_alt_ci95",
    *(f"{name}{s}_{kind}{ci}" for name in ("fid", "kid", "precision", "recall") for s in ("", "_alt")
      for kind in ("uncond", "cond") for ci in ("", "_ci95")),
    *(f"memorized_{kind}{ci}" for kind in ("uncond", "cond") for ci in ("", "_ci95")),
    "cas_samples", "cas_accuracy", "cas_accuracy_ci95", "cas_accuracy_real", "cas_accuracy_real_ci95",
}  # fmt: skip


def parent_runs(client):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs(
        [experiment.experiment_id], "tags.`ddpm.role` = 'pipeline'", order_by=["attributes.start_time ASC"]
    )


def children(client, parent):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def test_repro_lands_outputs_metrics_and_one_parent_run(tiny_pipeline, tmp_path):
    project_clone = tiny_pipeline  # after `dvc repro` with these params:
    params = tiny_raw(**TINY_PIPELINE)

    # Outputs: the EMA weights load as a plain state_dict; a loss row every train.log_every
    # steps and at each epoch's end (192 images at batch 64: 3 steps per epoch, 6 in all).
    log_every = params["train"]["log_every"]
    curve_steps = sorted({*range(log_every, 7, log_every), 3, 6})
    curves = {}
    for kind in ("uncond", "cond"):
        state = torch.load(project_clone / "models" / f"{kind}.pt", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        rows = list(csv.DictReader((project_clone / "reports" / f"loss_{kind}.csv").open()))
        assert list(rows[0]) == ["step", "epoch", "loss"]
        assert [int(r["step"]) for r in rows] == curve_steps and [int(r["epoch"]) for r in rows] == [
            1 + (s - 1) // 3 for s in curve_steps
        ]
        curves[kind] = [float(r["loss"]) for r in rows]
    assert "class_emb.weight" in torch.load(project_clone / "models" / "cond.pt", weights_only=True)

    client = MlflowClient(f"sqlite:///{project_clone}/mlflow.db")
    (parent,) = parent_runs(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["epochs"] == "2" and parent.data.params["sample.sampler"] == params["sample"]["sampler"]
    stage_runs = {r.info.run_name: r for r in children(client, parent)}
    assert sorted(stage_runs) == sorted(STAGES)
    for stage in ("train_uncond", "train_cond"):
        child = stage_runs[stage]
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "loss")
        assert [m.step for m in history] == curve_steps
        assert [m.value for m in history] == pytest.approx(curves[stage[6:]], abs=1e-6)
        for key in ("lr", "grad_norm", "images_per_s", "eps_loss/t000-199", "eps_loss/t800-999"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == curve_steps, key
        assert [m.step for m in client.get_metric_history(child.info.run_id, "epoch_loss")] == [1, 2]
        images = [a.path for a in client.list_artifacts(child.info.run_id, "images")]
        steps = sorted({int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png")})
        preview_every = params["train"]["preview_every"]
        assert steps == sorted({*range(preview_every, 7, preview_every), 6})
        # The training set as input dataset, system metrics, and a logged model that is
        # version 1 of the registered model, linked to its evaluate metrics.
        (dataset,) = child.inputs.dataset_inputs
        assert dataset.dataset.name == "mnist-train[:192]" and dataset.tags[0].value == "training"
        assert "system/cpu_utilization_percentage" in child.data.metrics
        (output,) = child.outputs.model_outputs
        version = client.get_model_version(f"ddpm-mnist-{stage[6:]}", "1")
        assert version.source == f"models:/{output.model_id}" and version.run_id == child.info.run_id
        assert version.tags["dvc.experiment"] == "workspace" and len(version.tags["git.revision"]) >= 40
        linked = {m.key for m in client.get_logged_model(output.model_id).metrics}
        assert f"fid_{stage[6:]}" in linked and f"zero_pixels_{stage[6:]}" in linked
        # The checkpoint and its autoguidance guide, byte for byte the DVC outputs.
        kind = stage[6:]
        logged = sorted(a.path for a in client.list_artifacts(child.info.run_id, "checkpoint"))
        assert logged == [f"checkpoint/{kind}.pt", f"checkpoint/{kind}_guide.pt"]
        for path in logged:
            local = client.download_artifacts(child.info.run_id, path, str(tmp_path))
            assert sha256_file(Path(local)) == sha256_file(project_clone / "models" / Path(path).name)
        guide_step = json.loads((project_clone / "reports" / f"train_{kind}.json").read_text())["guide_step"]
        assert guide_step == round(params["train"]["guide_at"] * 6)  # 6 steps in all
    # Stage runs log exactly the params their dvc.yaml entry lists.
    assert "train_cond.p_uncond" in stage_runs["train_cond"].data.params
    assert "train_cond.p_uncond" not in stage_runs["train_uncond"].data.params
    assert "sample.guidance" not in stage_runs["train_uncond"].data.params

    # Samples as users load them, and the metrics.
    n = params["evaluate"]["num_samples"]
    with np.load(project_clone / "data" / "samples" / "uncond.npz") as f:
        assert f["images"].shape == (n, 28, 28) and f["images"].dtype == np.uint8
    with np.load(project_clone / "data" / "samples" / "cond.npz") as f:
        assert f["images"].shape == (n, 28, 28) and f["images"].dtype == np.uint8
        assert f["labels"].dtype == np.int64 and np.bincount(f["labels"]).tolist() == [n // 10] * 10
    metrics = json.loads((project_clone / "reports" / "metrics.json").read_text())
    assert set(metrics) == METRICS
    assert metrics["num_samples"] == n and 0 <= metrics["cond_accuracy"] <= 1
    assert sum(metrics["uncond_class_fractions"].values()) == pytest.approx(1.0)
    # The second judge scores the same samples in its own space, beside its own floor.
    assert metrics["fid_alt_cond_over_floor"] == pytest.approx(metrics["fid_alt_cond"] / metrics["fid_alt_floor"])
    assert 0 <= metrics["cond_accuracy_alt"] <= 1
    # The real test images' background is mostly exact black; no histogram is farther than 1.
    assert metrics["zero_pixels_real"] > 0.75 and 0 <= metrics["pixel_hist_tv_uncond"] <= 1
    # Every interval is [low, high] around its number (FID's is bias-corrected, as the others)
    for key in (k for k in metrics if k.endswith("_ci95")):
        assert metrics[key]["low"] <= metrics[key.removesuffix("_ci95")] <= metrics[key]["high"], key
    assert 0 <= metrics["precision_cond"] <= 1 and 0 <= metrics["memorized_uncond"] <= 1
    assert parent_runs(client)[0].data.metrics["fid_cond_ci95.low"] == pytest.approx(metrics["fid_cond_ci95"]["low"])
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project_clone).stdout)
    assert shown[""]["data"]["reports/metrics.json"]["data"]["fid_cond"] == pytest.approx(metrics["fid_cond"])
    assert parent_runs(client)[0].data.metrics["fid_cond"] == pytest.approx(metrics["fid_cond"])
    assert parent_runs(client)[0].data.metrics["cond_accuracy_per_class.3"] == pytest.approx(
        metrics["cond_accuracy_per_class"]["3"]
    )
    # CAS: trained on the first cas_samples conditional samples, beside as many real digits
    assert metrics["cas_samples"] == params["evaluate"]["cas_samples"]
    assert 0 <= metrics["cas_accuracy"] <= 1 and 0 <= metrics["cas_accuracy_real"] <= 1
    # The ten samples nearest a training image (of the 2 × n), closest first, in the figure
    nearest = list(csv.DictReader((project_clone / "reports" / "nearest_train.csv").open()))
    assert len(nearest) == 10 and {r["model"] for r in nearest} <= {"uncond", "cond"}
    distances = [float(r["distance"]) for r in nearest]
    assert distances == sorted(distances) and all(0 <= int(r["sample"]) < n for r in nearest)
    training = load_images(
        project_clone / "data" / "dataset", "mnist", train=True, subset=params["data"]["train_subset"]
    )
    first = nearest[0]
    with np.load(project_clone / "data" / "samples" / f"{first['model']}.npz") as f:
        sample = torch.from_numpy(f["images"][int(first["sample"])]).float()
    pixel_l2 = (sample - training.images[int(first["train_index"]), 0].float()).norm().item()
    assert pixel_l2 == pytest.approx(distances[0], rel=1e-4)
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/loss.png", "figures/samples.png", "figures/nearest_training.png"} <= figures
    # The guidance sweep: its own samples, scores, table, figure and MLflow metrics.
    sweep = metrics["guidance_sweep"]
    assert (
        set(sweep) == {"num_samples", "fid_floor", "fid_alt_floor", "w0", "w3"}
        and sweep["num_samples"] == params["evaluate"]["sweep_samples"]
    )
    with np.load(project_clone / "data" / "samples" / "sweep" / "guidance_3.npz") as f:
        assert f["images"].shape == (sweep["num_samples"], 28, 28)
    table = list(csv.DictReader((project_clone / "reports" / "guidance_sweep.csv").open()))
    assert [float(r["guidance"]) for r in table] == [0.0, 3.0]
    assert float(table[1]["cond_accuracy"]) == pytest.approx(sweep["w3"]["cond_accuracy"])
    assert "figures/guidance_sweep.png" in figures
    assert parent_runs(client)[0].data.metrics["guidance_sweep.w3.fid"] == pytest.approx(sweep["w3"]["fid"])
    assert sweep["w3"]["fid_ci95"]["low"] <= sweep["w3"]["fid"] <= sweep["w3"]["fid_ci95"]["high"]
    # The autoguidance sweep: unconditional samples at each weight, both judges, class spread.
    autoguided = metrics["autoguidance_sweep"]
    assert set(autoguided) == {"num_samples", "fid_floor", "fid_alt_floor", "a1", "a2"}
    assert autoguided["num_samples"] == params["evaluate"]["sweep_samples"]
    assert autoguided["fid_floor"] == pytest.approx(sweep["fid_floor"])  # as many real images
    for row in (autoguided["a1"], autoguided["a2"]):
        assert {"fid", "fid_alt", "max_class_deviation", "max_class_deviation_alt", "fid_ci95"} <= set(row)
        assert (
            0 <= row["max_class_deviation"] <= 0.9 and row["fid_ci95"]["low"] <= row["fid"] <= row["fid_ci95"]["high"]
        )
    with np.load(project_clone / "data" / "samples" / "sweep" / "autoguidance_2.npz") as f:
        assert f["images"].shape == (autoguided["num_samples"], 28, 28) and "labels" not in f.files
    table = list(csv.DictReader((project_clone / "reports" / "autoguidance_sweep.csv").open()))
    assert list(table[0]) == ["autoguidance", "fid", "fid_alt", "max_class_deviation"]
    assert [float(r["autoguidance"]) for r in table] == [1.0, 2.0]
    assert float(table[1]["fid_alt"]) == pytest.approx(autoguided["a2"]["fid_alt"])
    assert (project_clone / "reports" / "figures" / "autoguidance_sweep.png").is_file()
    assert "figures/autoguidance_sweep.png" in figures
    assert parent_runs(client)[0].data.metrics["autoguidance_sweep.a2.fid"] == pytest.approx(autoguided["a2"]["fid"])
    # dvc exp show has the intervals as two columns (DVC leaves list-valued metrics out)
    table = run(["dvc", "exp", "show", "--csv", "--drop", ".*", "--keep", "fid_cond_ci95"], project_clone).stdout
    assert "fid_cond_ci95.low,fid_cond_ci95.high" in table.splitlines()[0]
    report = (project_clone / "reports" / "report.md").read_text()
    assert f"{metrics['fid_floor']:.3f}" in report and "torch" in report and "### Guidance sweep" in report
    default = f"`sample.autoguidance_uncond` = {params['sample']['autoguidance_uncond']:g}"
    assert "### Autoguidance sweep" in report and default in report
