"""MLflow: the only module of ddpm_core that talks to it.

One experiment for the project. Each pipeline execution is one parent run, found again
by the `ddpm.pipeline_id` tag that every stage of that execution carries; each stage is
a child run under it. The store is `sqlite:///<root>/mlflow.db` with artifacts in
`<root>/mlartifacts`, unless MLFLOW_TRACKING_URI says otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np
import requests
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ddpm_core.config import flatten
from ddpm_core.errors import TrackingError

# MLflow announces at INFO level that it creates or migrates its tables; stages stay quiet.
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)

EXPERIMENT = "ddpm-mnist"
PIPELINE_TAG = "ddpm.pipeline_id"
STAGE_TAG = "ddpm.stage"
ROLE_TAG = "ddpm.role"  # "pipeline" on parent runs, "stage" on their children


LOCK_RETRY_SECONDS = (1, 2, 4, 8, 15, 30, 60)  # waits between tries on a locked SQLite store


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve()}/mlflow.db"


class _PatientClient:
    """An MlflowClient whose calls wait out a locked SQLite store instead of failing.

    SQLite lets one writer in at a time and gives up after 5 s; parallel experiments
    (`dvc queue start -j 2`) can hold it longer than that.
    """

    def __init__(self, uri: str):
        self._client = MlflowClient(uri)

    def __getattr__(self, name: str):
        method = getattr(self._client, name)

        def patiently(*args, **kwargs):
            for wait in LOCK_RETRY_SECONDS:
                try:
                    return method(*args, **kwargs)
                except Exception as exc:
                    if "database is locked" not in str(exc):
                        raise
                    time.sleep(wait)
            return method(*args, **kwargs)

        return patiently


def _connect(root: Path) -> tuple[_PatientClient, str]:
    """A client and the project's experiment id, or a TrackingError saying what is wrong."""
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as exc:
            raise TrackingError(
                f"MLflow server {uri} (MLFLOW_TRACKING_URI) is unreachable: {type(exc).__name__}; "
                "start it, or unset MLFLOW_TRACKING_URI to use the project's own store"
            ) from None
    client = _PatientClient(uri)
    try:
        return client, _experiment_id(client, root)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"MLflow store {uri}: {first_line}") from None


def _experiment_id(client: _PatientClient, root: Path) -> str:
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

    def __init__(self, client: _PatientClient, run_id: str, parent_id: str):
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


def _find_or_start_parent(client: _PatientClient, experiment_id: str, pipeline_id: str, pipeline_name: str, all_params: dict) -> str:
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
    client, experiment_id = _connect(root)
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
