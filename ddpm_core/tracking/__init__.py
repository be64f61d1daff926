"""MLflow: the only package of ddpm_core that talks to it (the only one that imports mlflow).

One experiment for the project. Each pipeline execution is one parent run, found again
by the `ddpm.pipeline_id` tag that every stage of that execution carries; each stage is
a child run under it. The store is `sqlite:///<root>/mlflow.db` with artifacts in
`<root>/mlartifacts`, unless MLFLOW_TRACKING_URI says otherwise.

One module per idea; this package exports what the rest of the project uses:

    names           the experiment, tags, logged-model files, registered model names (no mlflow)
    store           the tracking URI, a client that waits out a locked SQLite store, reachability, the experiment
    system_metrics  MLflow's CPU, memory, disk and network monitor of a stage run
    runs            parent and stage runs: `stage_run`, `StageRun` (what a stage logs), orphaned runs
                    closed, `stage_minutes` (what an execution's stages took)
    models          logged and registered models; weights back from a model URI or a run (`checkpoint_from_*`)
    pyfunc          `DigitSampler`, the pyfunc flavour of a logged model (its code, signature, requirements)

Imports go one way: names ← store ← system_metrics, pyfunc ← models ← runs.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from ddpm_core.tracking.models import Checkpoint, checkpoint_from_model, checkpoint_from_run, log_model
from ddpm_core.tracking.names import (
    ENV_TAG_PREFIX,
    EXPERIMENT,
    GUIDE_FILE,
    GUIDE_TAG,
    HOST_TAG,
    KIND_TAG,
    MODEL_TYPE,
    PARAMS_FILE,
    PID_TAG,
    PIPELINE_TAG,
    PROJECT_TAG,
    ROLE_TAG,
    STAGE_TAG,
    WEIGHTS_FILE,
    WEIGHTS_TAG,
    checkpoint_artifact,
    guide_artifact,
    registered_name,
)
from ddpm_core.tracking.pyfunc import PYFUNC_CODE, DigitSampler
from ddpm_core.tracking.runs import StageRun, stage_minutes, stage_run
from ddpm_core.tracking.store import LOCK_RETRY_SECONDS, tracking_uri
from ddpm_core.tracking.system_metrics import SYSTEM_METRICS_SECONDS, system_metrics_enabled

__all__ = [
    "ENV_TAG_PREFIX",
    "EXPERIMENT",
    "GUIDE_FILE",
    "GUIDE_TAG",
    "HOST_TAG",
    "KIND_TAG",
    "LOCK_RETRY_SECONDS",
    "MODEL_TYPE",
    "PARAMS_FILE",
    "PID_TAG",
    "PIPELINE_TAG",
    "PROJECT_TAG",
    "PYFUNC_CODE",
    "ROLE_TAG",
    "STAGE_TAG",
    "SYSTEM_METRICS_SECONDS",
    "WEIGHTS_FILE",
    "WEIGHTS_TAG",
    "Checkpoint",
    "DigitSampler",
    "MlflowClient",
    "StageRun",
    "checkpoint_artifact",
    "checkpoint_from_model",
    "checkpoint_from_run",
    "guide_artifact",
    "log_model",
    "registered_name",
    "stage_minutes",
    "stage_run",
    "system_metrics_enabled",
    "tracking_uri",
]
