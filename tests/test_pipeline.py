"""End to end: the real `dvc repro` and `dvc exp run` in a fresh repository, with tiny
params, checked from the MLflow store itself."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import MIRROR, tiny_raw
from ddpm_core.tracking import EXPERIMENT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no MNIST mirror at {MIRROR}")]

STAGES = ["fetch_data", "train_uncond", "train_cond"]


def run(cmd, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["DDPM_DATA_MIRROR"] = str(MIRROR)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def parent_runs(client):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], "tags.`ddpm.role` = 'pipeline'", order_by=["attributes.start_time ASC"])


def children(client, parent):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def test_repro_then_experiment_land_as_two_parent_runs(project_clone):
    params = tiny_raw(epochs=2, data={"train_subset": 192})
    (project_clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "tiny params"], cwd=project_clone, check=True)

    run(["dvc", "repro"], project_clone)

    # Outputs: the EMA weights load as a plain state_dict; one loss row per epoch.
    for kind in ("uncond", "cond"):
        state = torch.load(project_clone / "models" / f"{kind}.pt", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        rows = list(csv.DictReader((project_clone / "reports" / f"loss_{kind}.csv").open()))
        assert [int(r["epoch"]) for r in rows] == [1, 2]
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
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2]
        assert len(client.get_metric_history(child.info.run_id, "lr")) == 2
        images = [a.path for a in client.list_artifacts(child.info.run_id, "images")]
        steps = sorted({p.split("+step+")[1].split("+")[0] for p in images if p.endswith(".png")})
        assert steps == ["1", "2"]
        (artifact,) = client.list_artifacts(child.info.run_id, "checkpoint")
        local = client.download_artifacts(child.info.run_id, artifact.path, str(project_clone / "dl"))
        assert torch.load(local, weights_only=True).keys() == torch.load(project_clone / "models" / f"{stage[6:]}.pt", weights_only=True).keys()
    # Stage runs log exactly the params their dvc.yaml entry lists.
    assert "train_cond.p_uncond" in stage_runs["train_cond"].data.params
    assert "train_cond.p_uncond" not in stage_runs["train_uncond"].data.params
    assert "sample.guidance" not in stage_runs["train_uncond"].data.params

    run(["dvc", "exp", "run", "-n", "three-epochs", "-S", "epochs=3"], project_clone)
    first, second = parent_runs(client)
    assert first.info.run_id == parent.info.run_id
    assert second.info.run_name == "three-epochs" and second.data.params["epochs"] == "3"
    # Only training reran: fetch_data is cached, so the experiment has two stage runs.
    assert sorted(r.info.run_name for r in children(client, second)) == ["train_cond", "train_uncond"]
    for child in children(client, second):
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2, 3]
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], project_clone).stdout
    assert "three-epochs" in shown
