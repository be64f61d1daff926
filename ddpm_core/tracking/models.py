"""Trained weights in MLflow: a logged model (the pyfunc `DigitSampler`) with a new
version of the registered model ddpm-mnist-<kind>, and the way back from a model URI or
a training run to the weights files (`checkpoint_from_model`, `checkpoint_from_run`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import mlflow.pyfunc
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.models import Model
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ddpm_core.environment import sha256_file
from ddpm_core.errors import RegistryError, TrackingError
from ddpm_core.tracking.names import (
    EXPERIMENT,
    GUIDE_FILE,
    GUIDE_TAG,
    KIND_TAG,
    MODEL_TYPE,
    PARAMS_FILE,
    PROJECT_TAG,
    ROLE_TAG,
    STAGE_TAG,
    WEIGHTS_FILE,
    WEIGHTS_TAG,
    checkpoint_artifact,
    guide_artifact,
    registered_name,
)
from ddpm_core.tracking.pyfunc import PYFUNC_CODE, _requirements, _signature
from ddpm_core.tracking.store import _existing_store, _first_line, _PatientClient, _stringify


class Checkpoint(NamedTuple):
    """Weights downloaded from MLflow: the model's state_dict file, the params it was
    trained with (flat dotted keys, values as logged text), and its autoguidance guide's
    state_dict file (None when the model or run has none: logged before guides were)."""

    weights: Path
    params: dict[str, str]
    guide: Path | None


def log_model(
    client: _PatientClient,
    experiment_id: str,
    run_id: str,
    parent_id: str,
    kind: str,
    weights: Path,
    params: dict[str, Any],
    version_tags: dict[str, str],
    guide: Path | None = None,
) -> tuple[str, int]:
    """`StageRun.log_model`'s work: the weights (and the guide, if given) as a logged model
    from run `run_id`, an output of it and of `parent_id`, and a new registered version.
    Returns (model id, version); on failure nothing READY nor registered is left."""
    name = registered_name(kind)
    existing = _registered_model(client, name)
    flat = _stringify(params)
    tags = {KIND_TAG: kind, WEIGHTS_TAG: sha256_file(weights)}
    if guide is not None:
        tags[GUIDE_TAG] = sha256_file(guide)
    model = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, params=flat, model_type=MODEL_TYPE, tags=tags
    )
    created = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec = Path(tmp) / PARAMS_FILE
            spec.write_text(json.dumps({"kind": kind, "params": flat}, indent=1))
            code = Path(tmp) / "digit_sampler.py"  # MLflow's "models from code": no pickle
            code.write_text(PYFUNC_CODE)
            local = Path(tmp) / "model"
            artifacts = {"weights": str(weights), "params": str(spec)}
            if guide is not None:
                artifacts["guide"] = str(guide)
            with warnings.catch_warnings(), _quiet_artifact_copies():
                warnings.filterwarnings("ignore", message=".*input example was not provided.*")
                mlflow.pyfunc.save_model(
                    local, python_model=str(code), artifacts=artifacts,
                    signature=_signature(kind), pip_requirements=_requirements(),
                    mlflow_model=Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id, model_id=model.model_id),
                )  # fmt: skip
            shutil.copy(weights, local / WEIGHTS_FILE)
            if guide is not None:
                shutil.copy(guide, local / GUIDE_FILE)
            shutil.copy(spec, local / PARAMS_FILE)
            client.log_model_artifacts(model.model_id, str(local))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        for run in (run_id, parent_id):
            client.log_outputs(run, [LoggedModelOutput(model.model_id, step=0)])
        if existing is None:
            try:
                client.create_registered_model(name, tags={PROJECT_TAG: EXPERIMENT, KIND_TAG: kind},
                                               description=f"ddpm-mnist: the {'class-conditional' if kind == 'cond' else 'unconditional'} diffusion model")  # fmt: skip
                created = True
            except mlflow.exceptions.MlflowException:
                _registered_model(client, name)  # made meanwhile by a parallel experiment: ours?
        # The source models:/<id> links the version to the logged model (the UI follows
        # it); the registry looks that id up in the process's global store, so point it at ours.
        with _global_store(client.uri):
            version = client.create_model_version(
                name,
                source=f"models:/{model.model_id}",
                run_id=run_id,
                tags=version_tags,
                model_id=model.model_id,
                await_creation_for=0,
            )
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        if created:
            with contextlib.suppress(Exception):
                client.delete_registered_model(name)
        raise
    return model.model_id, int(version.version)


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


def checkpoint_from_run(root: Path, run_id: str, kind: str, dest: Path) -> Checkpoint:
    """The weights a train_<kind> run logged (artifact checkpoint/<kind>.pt), downloaded
    into `dest`, the params that run read (flat dotted keys, values as logged text), and
    its guide (checkpoint/<kind>_guide.pt) if it logged one.

    `run_id` is that stage run, or a pipeline's parent run: then its latest finished
    train_<kind> child is taken.
    """
    client = _existing_store(root)
    uri = client.uri
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
    weights, guide = checkpoint_artifact(kind), guide_artifact(kind)
    try:
        local = client.download_artifacts(run.info.run_id, weights, str(dest))
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise TrackingError(f"MLflow run {run.info.run_id}: no {weights} artifact ({_first_line(exc)})") from None
    try:
        listed = {a.path for a in client.list_artifacts(run.info.run_id, guide.rsplit("/", 1)[0])}
        local_guide = client.download_artifacts(run.info.run_id, guide, str(dest)) if guide in listed else None
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise TrackingError(
            f"MLflow run {run.info.run_id}: its {guide} artifact could not be downloaded ({_first_line(exc)})"
        ) from None
    return Checkpoint(Path(local), dict(run.data.params), Path(local_guide) if local_guide else None)


def _parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/<name>/<version>, models:/<name>/latest, models:/<name>@<alias>, or
    models:/<model id> (a logged model) → (name or model id, version or "latest", alias)."""
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


def _model_version(client: _PatientClient, uri: str, name: str, version: str | None, alias: str | None) -> ModelVersion:
    """The registered version a URI names: by alias, by number, or the newest ("latest",
    any case, as MLflow reads it: the highest version number)."""
    if alias is not None:
        return client.get_model_version_by_alias(name, alias)
    assert version is not None
    if version.lower() != "latest":
        return client.get_model_version(name, version)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise RegistryError(f"{uri}: not found in {client.uri} (no registered model {name!r} with versions)")
    return max(versions, key=lambda v: int(v.version))


def checkpoint_from_model(root: Path, uri: str, kind: str, dest: Path) -> Checkpoint:
    """The weights of a model URI (a registered version, the latest version or an alias of
    ddpm-mnist-<kind>, or a logged model id), downloaded into `dest`, the params they were
    trained with (flat, as text), and the guide when the model has one. A URI that names
    nothing, or a model that is not this project's `kind` model, is a RegistryError naming it."""
    client = _existing_store(root)
    store = client.uri
    name, version, alias = _parse_model_uri(uri)
    try:
        if alias is not None or version is not None:
            found = _model_version(client, uri, name, version, alias)
            # A SQL store keeps the link to the logged model only as the source models:/<id>.
            source = found.source or ""
            model_id = found.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)
        else:
            model_id = name
        if not model_id:
            raise RegistryError(
                f"{uri}: this version has no logged model behind it; it was not registered by this project"
            )
        model = client.get_logged_model(model_id)
    except mlflow.exceptions.MlflowException as exc:
        raise RegistryError(f"{uri}: not found in {store} ({_first_line(exc)})") from None
    found_kind = model.tags.get(KIND_TAG)
    if model.model_type != MODEL_TYPE or found_kind not in ("cond", "uncond"):
        raise RegistryError(
            f"{uri}: not a ddpm-mnist model (model type {model.model_type!r}); give one of {registered_name('cond')} or {registered_name('uncond')}"
        )
    if found_kind != kind:
        hint = "drop --unconditional" if found_kind == "cond" else "add --unconditional (and drop --prompt)"
        raise RegistryError(f"{uri}: is the {'conditional' if found_kind == 'cond' else 'unconditional'} model; {hint}")
    files = [WEIGHTS_FILE, GUIDE_FILE] if GUIDE_TAG in model.tags else [WEIGHTS_FILE]
    local = []
    for file in files:
        try:
            local.append(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{model.artifact_location.rstrip('/')}/{file}", dst_path=str(dest), tracking_uri=store
                )
            )
        except (mlflow.exceptions.MlflowException, OSError) as exc:
            what = "weights" if file == WEIGHTS_FILE else "autoguidance guide"
            raise TrackingError(f"{uri}: its {what} could not be downloaded ({_first_line(exc)})") from None
    return Checkpoint(Path(local[0]), dict(model.params), Path(local[1]) if len(local) > 1 else None)
