"""Runs: each pipeline execution is one parent run, found again by the `ddpm.pipeline_id`
tag that every stage of it carries; each stage is a child run under it (`stage_run`),
and what a stage logs goes through its `StageRun`. Runs left RUNNING by a killed process
are closed when the next stage starts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelStatus,
    Metric,
    Param,
    RunStatus,
    RunTag,
)
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from ddpm_core.config import flatten
from ddpm_core.environment import sha256_file
from ddpm_core.errors import DDPMError, TrackingError
from ddpm_core.tracking import models
from ddpm_core.tracking.names import (
    ENV_TAG_PREFIX,
    EXPERIMENT,
    HOST_TAG,
    PID_TAG,
    PIPELINE_TAG,
    ROLE_TAG,
    STAGE_TAG,
    WEIGHTS_TAG,
    registered_name,
)
from ddpm_core.tracking.store import (
    _connect,
    _existing_store,
    _PatientClient,
    _shown,
    _stringify,
    _unreachable,
    tracking_uri,
)
from ddpm_core.tracking.system_metrics import _SystemMetrics, system_metrics_enabled


class StageRun:
    """A child run of the pipeline's parent run; what a stage logs goes here."""

    def __init__(self, client: _PatientClient, run_id: str, parent_id: str, experiment_id: str = ""):
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id
        self.experiment_id = experiment_id

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log numbers; nested dicts become dotted keys ({'acc': {'3': x}} → 'acc.3')."""
        self._log(self.run_id, metrics, step)

    def log_parent_metrics(self, metrics: dict) -> None:
        """Log final numbers on the pipeline's parent run, where runs are compared."""
        self._log(self.parent_id, metrics, None)

    def _log(self, run_id: str, metrics: dict, step: int | None, model_id: str | None = None) -> None:
        timestamp = int(time.time() * 1000)
        entries = [Metric(k, float(v), timestamp, step or 0, model_id=model_id) for k, v in flatten(metrics).items()]
        self.client.log_batch(run_id, metrics=entries)

    def log_model_metrics(self, model_id: str, metrics: dict) -> None:
        """Log numbers on this run, linked to a logged model: its page lists them."""
        self._log(self.run_id, metrics, None, model_id)

    def logged_model_of(self, weights: Path) -> str | None:
        """The id of the latest READY logged model holding exactly these weights, if any
        (none when DVC restored them from its cache after the store was reset)."""
        found = self.client.search_logged_models(
            [self.experiment_id], filter_string=f"tags.`{WEIGHTS_TAG}` = '{sha256_file(weights)}'",
            order_by=[{"field_name": "creation_time", "ascending": False}],
        )  # fmt: skip
        ready = [m for m in found if m.status == LoggedModelStatus.READY]
        return ready[0].model_id if ready else None

    def check_registry(self, kind: str) -> None:
        """Refuse, before any work, a registered model of our name that this project did not make."""
        models._registered_model(self.client, registered_name(kind))

    def log_model(
        self, kind: str, weights: Path, params: dict[str, Any], version_tags: dict[str, str], guide: Path | None = None
    ) -> tuple[str, int]:
        """The weights as an MLflow logged model (a pyfunc that draws images, `DigitSampler`)
        from this run, an output of this run and of the parent run, and a new version of
        the registered model `registered_name(kind)` tagged with `version_tags`. `guide`,
        the autoguidance guide's weights (models/<kind>_guide.pt), goes into the logged
        model too (guide.pt; its hash as tag ddpm.guide_sha256). Returns (model id,
        version). On failure the logged model is marked FAILED and no version (nor a
        registered model made for it) is left behind."""
        return models.log_model(
            self.client, self.experiment_id, self.run_id, self.parent_id, kind, weights, params, version_tags, guide
        )

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_parent_file(self, path: Path, name: str) -> None:
        """A file at the parent run's artifact root under `name`: the compare page previews
        the files two runs have in common side by side."""
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(path, Path(tmp) / name)
            self.client.log_artifact(self.parent_id, str(Path(tmp) / name))

    def log_parent_image(self, image: np.ndarray, key: str, step: int = 0) -> None:
        """An image on the parent run, where ticking two runs in the UI shows them side by side."""
        self.client.log_image(self.parent_id, image, key=key, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_parent_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.parent_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, Any], context: str) -> None:
        """An input dataset (MLflow's `log_input`) of this run and of the parent run, where
        the runs table's Dataset column shows it: `name`, a content `digest`, the local
        `source` folder, a `profile` (split, size, ...) and a `context` (training, evaluation)."""
        dataset = Dataset(name, digest, "local", json.dumps({"uri": source}), profile=json.dumps(profile))
        entry = DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for run_id in (self.run_id, self.parent_id):
            self.client.log_inputs(run_id, datasets=[entry])

    def set_parent_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.parent_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _find_or_start_parent(
    client: _PatientClient, experiment_id: str, pipeline_id: str, pipeline_name: str, all_params: dict
) -> str:
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{pipeline_id}' AND tags.`{ROLE_TAG}` = 'pipeline'",
        max_results=1,
    )
    if found:
        parent_id = found[0].info.run_id
        client.update_run(parent_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return parent_id
    parent = client.create_run(
        experiment_id, run_name=pipeline_name, tags={PIPELINE_TAG: pipeline_id, ROLE_TAG: "pipeline"}
    )
    params = _stringify(all_params)
    client.log_batch(parent.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return parent.info.run_id


def _process_alive(pid: int, started_ms: int) -> bool:
    """Whether `pid` is still the process that started a run at `started_ms` (a pid can be reused)."""
    try:
        return psutil.Process(pid).create_time() * 1000 <= started_ms + 1000
    except psutil.Error:
        return False


def _close_orphans(client: _PatientClient, experiment_id: str) -> None:
    """Mark KILLED the stage runs (and their parents) left RUNNING on this host by a
    process that no longer exists: a SIGKILL, a power cut, an out-of-memory kill."""
    running = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' AND tags.`{ROLE_TAG}` = 'stage' AND tags.`{HOST_TAG}` = '{socket.gethostname()}'",
    )
    for run in running:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and not _process_alive(int(pid), run.info.start_time):
            client.set_terminated(run.info.run_id, "KILLED")
            parent_id = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
            if parent_id and client.get_run(parent_id).info.status == "RUNNING":
                client.set_terminated(parent_id, "KILLED")


@contextlib.contextmanager
def stage_run(
    root: Path,
    pipeline_id: str,
    pipeline_name: str,
    stage: str,
    all_params: dict[str, Any],
    stage_params: dict[str, Any],
    environment: dict[str, str] | None = None,
) -> Iterator[StageRun]:
    """Open the child run `stage` under the parent run of `pipeline_id` (made on first use).

    `environment` (versions, device, git revision, input hashes) becomes `env.*` tags on
    both runs, and the git revision also MLflow's own source-commit tag.

    While it is open, MLflow's system-metrics monitor logs CPU, memory, disk and network
    use to it (`system/*`, every SYSTEM_METRICS_SECONDS) unless
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false.

    The child ends FINISHED, KILLED on Ctrl-C or SIGTERM, or FAILED if the body raises;
    the parent's status follows its latest child, so after the last stage it reads
    FINISHED. Runs orphaned by a SIGKILL are marked KILLED when the next stage starts.

    If the tracking server or database stops answering while the stage runs (after
    MLflow's own retries: MLFLOW_HTTP_REQUEST_MAX_RETRIES, about 4 minutes by default),
    the stage fails with a TrackingError naming it: the run is not lost silently, DVC
    records nothing of the stage, and `dvc repro` once the server is back starts it again
    (training from its last completed epoch).
    """
    client, experiment_id = _connect(root)
    _close_orphans(client, experiment_id)
    parent_id = _find_or_start_parent(client, experiment_id, pipeline_id, pipeline_name, all_params)
    child = client.create_run(
        experiment_id,
        run_name=stage,
        tags={
            MLFLOW_PARENT_RUN_ID: parent_id,
            PIPELINE_TAG: pipeline_id,
            STAGE_TAG: stage,
            ROLE_TAG: "stage",
            HOST_TAG: socket.gethostname(),
            PID_TAG: str(os.getpid()),
        },
    )
    run = StageRun(client, child.info.run_id, parent_id, experiment_id)
    if environment:
        tags = {f"{ENV_TAG_PREFIX}{k}": v for k, v in environment.items()}
        if "git_revision" in environment:
            tags[MLFLOW_GIT_COMMIT] = environment["git_revision"]
        run.set_tags(tags)
        run.set_parent_tags(tags)
    if stage_params:
        params = _stringify(stage_params)
        client.log_batch(run.run_id, params=[Param(k, v) for k, v in params.items()])
    monitor = None
    if system_metrics_enabled():
        monitor = _SystemMetrics(client, run.run_id, tracking_uri(root))
        monitor.start()
    status, lost = "FAILED", None
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except DDPMError:
        raise
    except Exception:
        lost = _unreachable(client.uri)
        if lost is None:
            raise
        raise TrackingError(
            f"{lost} since stage {stage} started; nothing of the stage is kept. "
            "Run `dvc repro` again once it is back (training resumes from its last completed epoch)"
        ) from None
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        if lost is None:
            client.set_terminated(run.run_id, status)
            client.set_terminated(parent_id, status)


def stage_minutes(root: Path) -> tuple[str, dict[str, float]]:
    """The newest pipeline execution of the store of `root` that ran a training stage: its
    name and the minutes each of its finished stage runs took (what tools/keep_run.py records)."""
    client = _existing_store(root)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise TrackingError(f"no experiment {EXPERIMENT!r} in {_shown(client.uri)}: run the pipeline first")
    parents = client.search_runs(
        [experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'pipeline'", order_by=["attributes.start_time DESC"]
    )
    for parent in parents:
        children = client.search_runs(
            [experiment.experiment_id],
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}' and attributes.status = 'FINISHED'",
        )
        minutes = {
            run.data.tags.get(STAGE_TAG, run.info.run_name): (run.info.end_time - run.info.start_time) / 60_000
            for run in children
            if run.info.end_time
        }
        if any(stage.startswith("train_") and stage != "train_evaluator" for stage in minutes):
            return parent.info.run_name, minutes
    raise TrackingError(f"no pipeline execution that trained a model in {_shown(client.uri)}")
