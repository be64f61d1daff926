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
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import psutil
import requests
from filelock import FileLock
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunStatus,
    RunTag,
)
from mlflow.entities.model_registry import RegisteredModel
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from ddpm_core.config import flatten
from ddpm_core.environment import sha256_file
from ddpm_core.errors import DDPMError, RegistryError, TrackingError

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


# Logged and registered models. A registered model this project made carries
# PROJECT_TAG; one of that name without it is someone else's, and is left alone.
PROJECT_TAG = "ddpm.project"
KIND_TAG = "ddpm.kind"  # uncond or cond, on logged models and on registered models
WEIGHTS_TAG = "ddpm.weights_sha256"  # on logged models: which models/<kind>.pt they hold
MODEL_TYPE = "ddpm-unet"
WEIGHTS_FILE = "weights.pt"  # artifacts of a logged model: the EMA state_dict ...
PARAMS_FILE = "params.json"  # ... and the params it was trained with, {kind, params (flat, text)}


def registered_name(kind: str) -> str:
    """The registered model that gets a version per trained model: ddpm-mnist-cond, -uncond."""
    return f"{EXPERIMENT}-{kind}"


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
        # The registry in the same store: by default MLflow takes the process's global one.
        self._client = MlflowClient(uri, registry_uri=uri)
        self.uri = uri

    def __getattr__(self, name: str) -> Any:
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


def _shown(uri: str) -> str:
    """A store URI as it may be printed: without a password."""
    if "://" in uri and "@" in uri.split("://", 1)[1]:
        with contextlib.suppress(Exception):
            from sqlalchemy.engine import make_url

            return make_url(uri).render_as_string(hide_password=True)
    return uri


def _unreachable(uri: str) -> str | None:
    """Why the tracking server or database of `uri` can't be reached now; None if it can
    (or if it is a file store, which has nothing to reach)."""
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as exc:
            return f"MLflow server {uri} (MLFLOW_TRACKING_URI) is unreachable: {type(exc).__name__}"
        return None
    if uri.startswith(("postgresql", "mysql", "mssql")):
        from sqlalchemy.engine import make_url

        url = make_url(uri)
        host, port = (
            url.host or "localhost",
            url.port or {"postgresql": 5432, "mysql": 3306}.get(url.get_backend_name(), 1433),
        )
        try:
            socket.create_connection((host, port), timeout=10).close()
        except OSError as exc:
            name = {"postgresql": "PostgreSQL", "mysql": "MySQL"}.get(url.get_backend_name(), "database")
            return f"{name} at {host}:{port} (MLFLOW_TRACKING_URI {_shown(uri)}) is unreachable: {exc.strerror or type(exc).__name__}"
    return None


def _connect(root: Path) -> tuple[_PatientClient, str]:
    """A client and the project's experiment id, or a TrackingError saying what is wrong."""
    uri = tracking_uri(root)
    why = _unreachable(uri)
    if why:
        raise TrackingError(f"{why}; start it, or unset MLFLOW_TRACKING_URI to use the project's own store")
    try:
        with _store_creation_lock(uri):
            client = _PatientClient(uri)
            return client, _experiment_id(client, root)
    except ModuleNotFoundError as exc:
        raise TrackingError(
            f"MLflow store {_shown(uri)} needs the Python package {exc.name!r}: "
            "pip install -e '.[team]' (the PostgreSQL driver psycopg)"
        ) from None
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"MLflow store {_shown(uri)}: {first_line}") from None


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

    def finish(self) -> None:
        """Stop, then log one last sample: a stage shorter than the interval still gets one."""
        started = self._process is not None
        super().finish()
        if started:
            with contextlib.suppress(Exception):  # never fail a stage over its system metrics
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())

    def publish_metrics(self, metrics: dict[str, float]) -> None:
        timestamp = int(time.time() * 1000)
        entries = [
            Metric(self._metrics_prefix + k, float(v), timestamp, self._logging_step) for k, v in metrics.items()
        ]
        self._client.log_batch(self._run_id, metrics=entries)
        self._logging_step += 1
        for monitor in self.monitors:
            monitor.clear_metrics()


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
        _registered_model(self.client, registered_name(kind))

    def log_model(
        self, kind: str, weights: Path, params: dict[str, Any], version_tags: dict[str, str]
    ) -> tuple[str, int]:
        """The weights as an MLflow logged model (a pyfunc that draws images, `DigitSampler`)
        from this run, an output of this run and of the parent run, and a new version of
        the registered model `registered_name(kind)` tagged with `version_tags`. Returns
        (model id, version). On failure the logged model is marked FAILED and no version
        (nor a registered model made for it) is left behind."""
        name = registered_name(kind)
        existing = _registered_model(self.client, name)
        flat = _stringify(params)
        digest = sha256_file(weights)
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=self.run_id, params=flat, model_type=MODEL_TYPE,
            tags={KIND_TAG: kind, WEIGHTS_TAG: digest},
        )  # fmt: skip
        created = False
        try:
            with tempfile.TemporaryDirectory() as tmp:
                spec = Path(tmp) / PARAMS_FILE
                spec.write_text(json.dumps({"kind": kind, "params": flat}, indent=1))
                code = Path(tmp) / "digit_sampler.py"  # MLflow's "models from code": no pickle
                code.write_text(PYFUNC_CODE)
                local = Path(tmp) / "model"
                with warnings.catch_warnings(), _quiet_artifact_copies():
                    warnings.filterwarnings("ignore", message=".*input example was not provided.*")
                    mlflow.pyfunc.save_model(
                        local, python_model=str(code), artifacts={"weights": str(weights), "params": str(spec)},
                        signature=_signature(kind), pip_requirements=_requirements(),
                        mlflow_model=Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=self.run_id, model_id=model.model_id),
                    )  # fmt: skip
                shutil.copy(weights, local / WEIGHTS_FILE)
                shutil.copy(spec, local / PARAMS_FILE)
                self.client.log_model_artifacts(model.model_id, str(local))
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
            for run_id in (self.run_id, self.parent_id):
                self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
            if existing is None:
                try:
                    self.client.create_registered_model(name, tags={PROJECT_TAG: EXPERIMENT, KIND_TAG: kind},
                                                        description=f"ddpm-mnist: the {'class-conditional' if kind == 'cond' else 'unconditional'} diffusion model")  # fmt: skip
                    created = True
                except mlflow.exceptions.MlflowException:
                    _registered_model(self.client, name)  # made meanwhile by a parallel experiment: ours?
            # The source models:/<id> links the version to the logged model (the UI follows
            # it); the registry looks that id up in the process's global store, so point it at ours.
            with _global_store(self.client.uri):
                version = self.client.create_model_version(
                    name,
                    source=f"models:/{model.model_id}",
                    run_id=self.run_id,
                    tags=version_tags,
                    model_id=model.model_id,
                    await_creation_for=0,
                )
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            if created:
                with contextlib.suppress(Exception):
                    self.client.delete_registered_model(name)
            raise
        return model.model_id, int(version.version)

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


@contextlib.contextmanager
def _quiet_artifact_copies() -> Iterator[None]:
    """No "Downloading artifacts" bars while save_model copies the weights into the model."""
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"]
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before


@contextlib.contextmanager
def _global_store(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for a moment, then as it was (it is
    also the environment variable MLFLOW_TRACKING_URI, which `tracking_uri` reads)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        # None unsets it: MLflow takes None, though it annotates `str | Path`.
        mlflow.set_tracking_uri(before)  # type: ignore[arg-type]


def _registered_model(client: _PatientClient, name: str) -> RegisteredModel | None:
    """The registered model `name` if it exists (None if not); a RegistryError if it exists
    but this project did not make it."""
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if model.tags.get(PROJECT_TAG) != EXPERIMENT:
        raise RegistryError(
            f"registered model {name!r} exists in the MLflow store but was not made by this project (no {PROJECT_TAG} tag); "
            "rename or delete it, or use another MLFLOW_TRACKING_URI"
        )
    return model


def _signature(kind: str) -> ModelSignature:
    """Input: one row per image (column `label`, the class, for the conditional model; any
    column for the unconditional one); params: the sampler's; output: uint8 (N, 28, 28)."""
    from ddpm_core.generation import DEFAULT_SAMPLE

    columns: list[ColSpec | TensorSpec] = (
        [ColSpec("long", "label")] if kind == "cond" else [ColSpec("long", "index", required=False)]
    )
    params = ParamSchema([
        ParamSpec("seed", "long", 0), ParamSpec("sampler", "string", DEFAULT_SAMPLE["sampler"]),
        ParamSpec("steps", "long", DEFAULT_SAMPLE["steps"]), ParamSpec("guidance", "double", DEFAULT_SAMPLE["guidance"]),
    ])  # fmt: skip
    return ModelSignature(
        inputs=Schema(columns), outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]), params=params
    )


def _requirements() -> list[str]:
    """What loading the pyfunc elsewhere needs: this project (ddpm_core) and its pins."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "torchvision", "numpy", "pandas", "pyyaml", "pydantic", "mlflow"):
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{package}=={version(package)}")
    return pins


class DigitSampler(PythonModel):
    """The pyfunc flavour of a trained model: `mlflow.pyfunc.load_model(uri).predict(df)`
    draws one image per row of `df` (the conditional model reads the class from its
    `label` column), with params seed, sampler, steps and guidance, and returns them as
    uint8 (N, 28, 28). The same input and params give the same bytes. Needs ddpm_core
    importable (this project installed) where it is loaded."""

    def load_context(self, context: PythonModelContext) -> None:
        from ddpm_core import hardware
        from ddpm_core.generation import load_unet, params_from_logged

        spec = json.loads(Path(context.artifacts["params"]).read_text())
        self.kind = spec["kind"]
        model_params, self.diffusion, self.dataset = params_from_logged(spec["params"], "this model")
        self.device = hardware.pick_device()
        self.model = load_unet(Path(context.artifacts["weights"]), model_params, self.kind == "cond", self.device)

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        import torch

        from ddpm_core import hardware
        from ddpm_core.data import NUM_CLASSES
        from ddpm_core.generation import DEFAULT_SAMPLE, generate, sampler_for

        p = {**DEFAULT_SAMPLE, **(params or {})}
        labels = None
        if self.kind == "cond":
            labels = torch.tensor(np.asarray(model_input["label"], dtype=np.int64))
            if labels.numel() and not bool(((labels >= 0) & (labels < NUM_CLASSES)).all()):
                raise ValueError(f"label must be a class 0..{NUM_CLASSES - 1}; got {sorted(set(labels.tolist()))}")
        sampler = sampler_for(self.diffusion, p, int(p["steps"]))
        generator = torch.Generator().manual_seed(int(p["seed"]))
        guidance = float(p["guidance"]) if labels is not None else 1.0
        autocast = hardware.sampling_autocast(self.device)
        images = generate(
            self.model,
            sampler,
            len(model_input),
            generator,
            labels,
            guidance,
            128,
            self.device,
            autocast,
            desc="pyfunc",
        )
        return images[:, 0].numpy()


# The pyfunc's code, saved with each logged model (MLflow's "models from code").
PYFUNC_CODE = """\
import mlflow
from ddpm_core.tracking import DigitSampler

mlflow.models.set_model(DigitSampler())
"""


def _parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/<name>/<version>, models:/<name>@<alias>, or models:/<model id> (a logged
    model) → (name or model id, version, alias)."""
    if not uri.startswith("models:/") or not uri.removeprefix("models:/").strip("/"):
        raise RegistryError(
            f"{uri}: not a model URI; give models:/<name>/<version>, models:/<name>@<alias> or models:/<model id>"
        )
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    if "/" in rest:
        name, version = rest.split("/", 1)
        return name, version, None
    return rest, None, None


def checkpoint_from_model(root: Path, uri: str, kind: str, dest: Path) -> tuple[Path, dict[str, str]]:
    """The weights of a model URI (a registered version or alias of ddpm-mnist-<kind>, or a
    logged model id), downloaded into `dest`, and the params they were trained with (flat,
    as text). A URI that names nothing, or a model that is not this project's `kind`
    model, is a RegistryError naming it."""
    store = tracking_uri(root)
    if store.startswith("sqlite:///") and not Path(_sqlite_path(store)).exists():
        raise TrackingError(f"no MLflow store at {store}; run from the project folder, or set MLFLOW_TRACKING_URI")
    client = _PatientClient(store)
    name, version, alias = _parse_model_uri(uri)
    try:
        if alias is not None or version is not None:
            found = (
                client.get_model_version_by_alias(name, alias)
                if alias is not None
                else client.get_model_version(name, version)
            )
            # A SQL store keeps the link to the logged model only as the source models:/<id>.
            model_id = found.model_id or (
                found.source.removeprefix("models:/") if found.source.startswith("models:/m-") else None
            )
        else:
            model_id = name
        if not model_id:
            raise RegistryError(
                f"{uri}: this version has no logged model behind it; it was not registered by this project"
            )
        model = client.get_logged_model(model_id)
    except mlflow.exceptions.MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegistryError(f"{uri}: not found in {store} ({first})") from None
    found = model.tags.get(KIND_TAG)
    if model.model_type != MODEL_TYPE or found not in ("cond", "uncond"):
        raise RegistryError(
            f"{uri}: not a ddpm-mnist model (model type {model.model_type!r}); give one of {registered_name('cond')} or {registered_name('uncond')}"
        )
    if found != kind:
        hint = "drop --unconditional" if found == "cond" else "add --unconditional (and drop --prompt)"
        raise RegistryError(f"{uri}: is the {'conditional' if found == 'cond' else 'unconditional'} model; {hint}")
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model.artifact_location.rstrip('/')}/{WEIGHTS_FILE}", dst_path=str(dest), tracking_uri=store
        )
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"{uri}: its weights could not be downloaded ({first})") from None
    return Path(local), dict(model.params)
