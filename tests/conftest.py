import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddpm_core.config import Params, parse_params

ROOT = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("DDPM_DATA_MIRROR", ROOT.parent / "shared" / "data" / "mnist")).resolve()

# A shell that starts the tests in the background (`make test &`) hands them SIGINT
# ignored, and every stage they start inherits that, so no Ctrl-C test could interrupt
# anything. Restore what a terminal gives: SIGINT raises KeyboardInterrupt here, and
# child processes start with the default disposition.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# `make test` runs two pytest-xdist workers that take whole files (`--dist loadfile`) in
# collection order. The files that take minutes go first, longest first, so that neither
# worker ends the run alone on a long file while the other idles.
LONGEST_FIRST = [
    "test_team.py", "test_reproducibility.py", "test_faults.py", "test_hard_inputs.py", "test_docs.py", "test_mlflow_ui.py", "test_judges.py",
    "test_submission.py", "test_generate.py", "test_fashion.py", "test_pipeline.py", "test_distributed.py",
]  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


# Small enough for seconds on a CPU, large enough to exercise every code path.
TINY = {
    "epochs": 1,
    "data": {"train_subset": 256},
    "model": {"channels": [16, 32], "attention_heads": 2},
    "train": {"batch_size": 64, "warmup_steps": 2, "preview_steps": 3, "log_every": 2, "preview_every": 3},
    "sample": {"steps": 5, "batch_size": 100},
    "evaluate": {
        "num_samples": 20,
        "guidance_sweep": [0, 3],
        "autoguidance_sweep": [1, 2],
        "sweep_samples": 10,
        "cas_samples": 20,
        "cas_epochs": 1,
        "test_subset": 1000,
    },
    "evaluator": {"epochs": 1, "train_subset": 1000},
    "evaluator_alt": {"epochs": 1, "train_subset": 1000},
}


def merged(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) else value
    return out


def tiny_raw(**override) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return merged(merged(raw, TINY), override)


@pytest.fixture
def tiny_params() -> Params:
    return parse_params(tiny_raw())


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """MNIST fetched once per test session from the local mirror."""
    if not MIRROR.is_dir():
        pytest.skip(f"no MNIST mirror at {MIRROR}; set DDPM_DATA_MIRROR")
    from ddpm_core.data import fetch

    root = tmp_path_factory.mktemp("mnist")
    fetch("mnist", root, MIRROR)
    return root


def clone_project(clone: Path) -> Path:
    """Make `clone` a fresh git repository holding this checkout's files (committed or
    not, without generated data, models or MLflow store), ready for `dvc repro`."""
    shutil.copytree(
        ROOT,
        clone,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "cache",
            "data",
            "models",
            "mlflow.db*",
            "mlartifacts",
            ".ddpm",
            "__pycache__",
            "*.egg-info",
            ".pytest_cache",
            "tmp",
        ),
    )
    for sub in ("data", "models"):
        (clone / sub).mkdir(exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
    subprocess.run(["git", "add", "-A"], cwd=clone, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "test"], cwd=clone, check=True)
    return clone


@pytest.fixture
def project_clone(tmp_path) -> Path:
    """A fresh copy of the project in a git repository of its own (see clone_project)."""
    return clone_project(tmp_path / "project")


def commit_all(project: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], cwd=project, check=True
    )


def clean_env() -> dict[str, str]:
    """The environment of a user's shell: no MLflow or DVC variables of ours leaking in,
    the MNIST mirror set, and this interpreter's bin first on PATH (dvc, mlflow)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["DDPM_DATA_MIRROR"] = str(MIRROR)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m <cmd>` (e.g. ["dvc", "repro"]) in `cwd`; fails the test with its output."""
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# The params of the shared tiny pipeline: two epochs, so curves and per-epoch grids have two points.
TINY_PIPELINE = {"epochs": 2, "data": {"train_subset": 192}}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A project copy after one tiny `dvc repro` (about 90 s), made once per session.
    Read it, don't change it: tests that run more use `tiny_pipeline_copy`."""
    if not MIRROR.is_dir():
        pytest.skip(f"no MNIST mirror at {MIRROR}; set DDPM_DATA_MIRROR")
    project = clone_project(tmp_path_factory.mktemp("tiny") / "project")
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_raw(**TINY_PIPELINE), sort_keys=False))
    commit_all(project, "tiny params")
    run(["dvc", "repro"], project)
    return project


@pytest.fixture
def tiny_pipeline_copy(tiny_pipeline, tmp_path) -> Path:
    """A private copy of `tiny_pipeline`: git, DVC cache, outputs and MLflow store."""
    return copy_project(tiny_pipeline, tmp_path / "project")


def copy_project(project: Path, copy: Path) -> Path:
    """A copy of a project folder that works on its own. The MLflow store's artifact
    locations are absolute paths, so they are moved to the copy."""
    shutil.copytree(project, copy, symlinks=True)
    old, new = str(project), str(copy)
    with sqlite3.connect(copy / "mlflow.db") as db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
        db.execute("UPDATE logged_models SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        db.execute("UPDATE model_versions SET storage_location = replace(storage_location, ?, ?)", (old, new))
    return copy
