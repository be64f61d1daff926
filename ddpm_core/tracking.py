"""MLflow: the only module of ddpm_core that talks to it.

One experiment for the project. Each pipeline execution is one parent run, found again
by the `ddpm.pipeline_id` tag that every stage of that execution carries; each stage is
a child run under it. The store is `sqlite:///<root>/mlflow.db` with artifacts in
`<root>/mlartifacts`, unless MLFLOW_TRACKING_URI says otherwise.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ddpm_core.config import flatten

EXPERIMENT = "ddpm-mnist"
PIPELINE_TAG = "ddpm.pipeline_id"
STAGE_TAG = "ddpm.stage"
ROLE_TAG = "ddpm.role"  # "pipeline" on parent runs, "stage" on their children


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve()}/mlflow.db"


def _experiment_id(client: MlflowClient, root: Path) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (Path(root).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it in the meantime.
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def _stringify(params: dict[str, Any]) -> dict[str, str]:
    return {k: "null" if v is None else str(v) for k, v in params.items()}


class StageRun:
    """A child run of the pipeline's parent run; what a stage logs goes here."""

    def __init__(self, client: MlflowClient, run_id: str, parent_id: str):
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log numbers; nested dicts become dotted keys ({'acc': {'3': x}} → 'acc.3')."""
        self._log(self.run_id, metrics, step)

    def log_parent_metrics(self, metrics: dict) -> None:
        """Log final numbers on the pipeline's parent run, where runs are compared."""
        self._log(self.parent_id, metrics, None)

    def _log(self, run_id: str, metrics: dict, step: int | None) -> None:
        timestamp = int(time.time() * 1000)
        entries = [Metric(k, float(v), timestamp, step or 0) for k, v in flatten(metrics).items()]
        self.client.log_batch(run_id, metrics=entries)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_parent_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.parent_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def set_parent_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.parent_id, key, str(value))


def _find_or_start_parent(client: MlflowClient, experiment_id: str, pipeline_id: str, pipeline_name: str, all_params: dict) -> str:
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pipeline_id}' AND tags.`{ROLE_TAG}` = 'pipeline'",
        max_results=1,
    )
    if found:
        parent_id = found[0].info.run_id
        client.update_run(parent_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return parent_id
    parent = client.create_run(experiment_id, run_name=pipeline_name, tags={PIPELINE_TAG: pipeline_id, ROLE_TAG: "pipeline"})
    params = _stringify(all_params)
    client.log_batch(parent.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return parent.info.run_id


@contextlib.contextmanager
def stage_run(
    root: Path,
    pipeline_id: str,
    pipeline_name: str,
    stage: str,
    all_params: dict[str, Any],
    stage_params: dict[str, Any],
) -> Iterator[StageRun]:
    """Open the child run `stage` under the parent run of `pipeline_id` (made on first use).

    The child ends FINISHED, or FAILED if the body raises; the parent's status follows
    its latest child, so after the last stage it reads FINISHED.
    """
    client = MlflowClient(tracking_uri(root))
    experiment_id = _experiment_id(client, root)
    parent_id = _find_or_start_parent(client, experiment_id, pipeline_id, pipeline_name, all_params)
    child = client.create_run(
        experiment_id,
        run_name=stage,
        tags={MLFLOW_PARENT_RUN_ID: parent_id, PIPELINE_TAG: pipeline_id, STAGE_TAG: stage, ROLE_TAG: "stage"},
    )
    run = StageRun(client, child.info.run_id, parent_id)
    if stage_params:
        params = _stringify(stage_params)
        client.log_batch(run.run_id, params=[Param(k, v) for k, v in params.items()])
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        client.set_terminated(run.run_id, status)
        client.set_terminated(parent_id, status)
