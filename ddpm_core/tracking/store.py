"""The MLflow store: where it is, a client that waits out a locked SQLite store, whether
a server or database can be reached, and the project's experiment in it."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import mlflow
import requests
from filelock import FileLock
from mlflow.tracking import MlflowClient

from ddpm_core.errors import TrackingError
from ddpm_core.tracking.names import EXPERIMENT

# MLflow announces at INFO level that it creates or migrates its tables; stages stay quiet.
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)

LOCK_RETRY_SECONDS = (1, 2, 4, 8, 15, 30, 60)  # waits between tries on a locked SQLite store


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


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


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
        raise TrackingError(f"MLflow store {_shown(uri)}: {_first_line(exc)}") from None


def _existing_store(root: Path) -> _PatientClient:
    """A client of the store of `root` for reading what is in it: a TrackingError if it is
    a SQLite store that does not exist (reading must not create an empty one)."""
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///") and not Path(_sqlite_path(uri)).exists():
        raise TrackingError(f"no MLflow store at {uri}; run from the project folder, or set MLFLOW_TRACKING_URI")
    return _PatientClient(uri)


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
    """Params as MLflow keeps them: text, None as "null"."""
    return {k: "null" if v is None else str(v) for k, v in params.items()}
