"""Errors a user can act on, and how a command reports them: one line each on stderr,
and a non-zero exit status."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable


class DDPMError(Exception):
    """Base for errors whose message alone tells the user what to fix."""

    exit_code = 1


class ConfigError(DDPMError):
    """params.yaml is not what the schema allows."""

    exit_code = 2


class DataError(DDPMError):
    """A dataset file is missing, truncated or not the official one, or can't be written."""


class TrainingError(DDPMError):
    """Training diverged (a non-finite loss)."""


class TrackingError(DDPMError):
    """The MLflow store can't be reached or written."""


class RegistryError(DDPMError):
    """A registered model name or model URI that is not this project's, or that names
    nothing (an unknown version or alias)."""

    exit_code = 2


class CheckpointError(DDPMError):
    """A checkpoint is missing, truncated, or not a plain tensor file."""


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def exit_on_error(body: Callable[[], None]) -> None:
    """Run a command's `body`. A DDPMError, an OSError (disk full, read-only folder: with
    the file's name) or an interruption becomes one line on stderr and an exit status:
    the error's own, 1, or 128 + the signal. SIGTERM (what `kill`, schedulers and
    `timeout` send) is handled as Ctrl-C is, so `finally` blocks and context managers run."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        body()
    except DDPMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:
        print(f"error: {exc.filename}: {exc.strerror}" if exc.filename else f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        name = exc.args[0] if exc.args else "SIGINT"
        print(f"interrupted ({name})", file=sys.stderr)
        sys.exit(128 + signal.Signals[name].value)
