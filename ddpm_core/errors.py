"""Errors a user can act on. Stages print them as one line each and exit non-zero."""


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


class CheckpointError(DDPMError):
    """A checkpoint is missing, truncated, or not a plain tensor file."""
