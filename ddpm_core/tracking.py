"""MLflow: the only module of ddpm_core that talks to it.

One experiment for the project. Each pipeline execution is one parent run, found again
by the `ddpm.pipeline_id` tag that every stage of that execution carries; each stage is
a child run under it. The store is `sqlite:///<root>/mlflow.db` with artifacts in
`<root>/mlartifacts`, unless MLFLOW_TRACKING_URI says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np
import psutil
import requests
from filelock import FileLock
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from ddpm_core.config import flatten
from ddpm_core.errors import TrackingError

# MLflow announces at INFO level that it creates or migrates its tables; stages stay quiet.
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# The system-metrics monitor announces its start and stop, and warns when one of its
# status reads meets a store locked by a parallel experiment (it tries again 10 s later).
logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.ERROR)

EXPERIMENT = "ddpm-mnist"
PIPELINE_TAG = "ddpm.pipeline_id"
STAGE_TAG = "ddpm.stage"
ROLE_TAG = "ddpm.role"  # "pipeline" on parent runs, "stage" on their children
ENV_TAG_PREFIX = "env."
HOST_TAG = "ddpm.host"  # with PID_TAG: which process a stage run belongs to, to spot orphans
PID_TAG = "ddpm.pid"


LOCK_RETRY_SECONDS = (1, 2, 4, 8, 15, 30, 60)  # waits between tries on a locked SQLite store
SYSTEM_METRICS_SECONDS = 10  # sampling interval of CPU, memory, disk and network (system/* metrics)


def system_metrics_enabled() -> bool:
    """On unless MLflow's own switch, MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, says false (or 0)."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() not in ("false", "0", "no")


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
    try:
        with _store_creation_lock(uri):
            client = _PatientClient(uri)
            return client, _experiment_id(client, root)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"MLflow store {uri}: {first_line}") from None


def _sqlite_path(uri: str) -> str:
    return uri.removeprefix("sqlite:///")


def _store_creation_lock(uri: str) -> contextlib.AbstractContextManager:
    """A lock beside a SQLite store, held while it is first opened: MLflow creates and
    migrates its tables then, and two processes doing it at once (two queued experiments
    starting together) fail with "duplicate column name". Other stores need none."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return FileLock(_sqlite_path(uri) + ".lock", timeout=600)


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


class _SystemMetrics(SystemMetricsMonitor):
    """MLflow's system-metrics monitor, writing through the patient client: its own client
    gives up on a SQLite store locked by a parallel experiment and says so on stderr."""

    def __init__(self, client: _PatientClient, run_id: str, uri: str):
        super().__init__(run_id, sampling_interval=SYSTEM_METRICS_SECONDS, tracking_uri=uri)
        self._client = client

    def publish_metrics(self, metrics: dict[str, float]) -> None:
        timestamp = int(time.time() * 1000)
        entries = [Metric(self._metrics_prefix + k, float(v), timestamp, self._logging_step) for k, v in metrics.items()]
        self._client.log_batch(self._run_id, metrics=entries)
        self._logging_step += 1
        for monitor in self.monitors:
            monitor.clear_metrics()


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
    """
    client, experiment_id = _connect(root)
    _close_orphans(client, experiment_id)
    parent_id = _find_or_start_parent(client, experiment_id, pipeline_id, pipeline_name, all_params)
    child = client.create_run(
        experiment_id,
        run_name=stage,
        tags={
            MLFLOW_PARENT_RUN_ID: parent_id, PIPELINE_TAG: pipeline_id, STAGE_TAG: stage, ROLE_TAG: "stage",
            HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
        },  # fmt: skip
    )
    run = StageRun(client, child.info.run_id, parent_id)
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
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        client.set_terminated(run.run_id, status)
        client.set_terminated(parent_id, status)


def checkpoint_from_run(root: Path, run_id: str, kind: str, dest: Path) -> tuple[Path, dict[str, str]]:
    """The weights a train_<kind> run logged (artifact checkpoint/<kind>.pt), downloaded
    into `dest`, and the params that run read (flat dotted keys, values as logged text).

    `run_id` is that stage run, or a pipeline's parent run: then its latest finished
    train_<kind> child is taken.
    """
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///") and not Path(_sqlite_path(uri)).exists():
        raise TrackingError(f"no MLflow store at {uri}; run from the project folder, or set MLFLOW_TRACKING_URI")
    client = _PatientClient(uri)
    stage = f"train_{kind}"
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise TrackingError(f"MLflow run {run_id}: not found in {uri}") from None
    if run.data.tags.get(ROLE_TAG) == "pipeline":
        children = client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}' AND tags.`{STAGE_TAG}` = '{stage}' AND attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not children:
            raise TrackingError(
                f"pipeline run {run_id} has no finished {stage} run (DVC may have taken models/{kind}.pt "
                f"from its cache); give the id of the {stage} run that trained it"
            )
        run = children[0]
    elif run.data.tags.get(STAGE_TAG) != stage:
        found = run.data.tags.get(STAGE_TAG)
        what = f"a {found} run" if found else "not a run of this pipeline"
        raise TrackingError(f"MLflow run {run_id} is {what}; give a {stage} run or a pipeline's parent run")
    try:
        local = client.download_artifacts(run.info.run_id, f"checkpoint/{kind}.pt", str(dest))
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"MLflow run {run.info.run_id}: no checkpoint/{kind}.pt artifact ({first})") from None
    return Path(local), dict(run.data.params)
