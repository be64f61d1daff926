"""What the project calls things in MLflow: its experiment, the tags it puts on runs and
models, the files of a logged model, its registered models. Plain strings: no MLflow here."""

from __future__ import annotations

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
GUIDE_TAG = "ddpm.guide_sha256"  # on logged models with a guide: which models/<kind>_guide.pt
MODEL_TYPE = "ddpm-unet"
WEIGHTS_FILE = "weights.pt"  # artifacts of a logged model: the EMA state_dict ...
GUIDE_FILE = "guide.pt"  # ... the autoguidance guide's state_dict, when it has one ...
PARAMS_FILE = "params.json"  # ... and the params it was trained with, {kind, params (flat, text)}


def registered_name(kind: str) -> str:
    """The registered model that gets a version per trained model: ddpm-mnist-cond, -uncond."""
    return f"{EXPERIMENT}-{kind}"


def checkpoint_artifact(kind: str) -> str:
    """Where a train_<kind> run logs its weights (models/<kind>.pt) among its artifacts."""
    return f"checkpoint/{kind}.pt"


def guide_artifact(kind: str) -> str:
    """Where a train_<kind> run logs its autoguidance guide (models/<kind>_guide.pt)."""
    return f"checkpoint/{kind}_guide.pt"
