import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ddpm_core.config import Params, parse_params

ROOT = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("DDPM_DATA_MIRROR", ROOT.parent / "shared" / "data" / "mnist")).resolve()

# Small enough for seconds on a CPU, large enough to exercise every code path.
TINY = {
    "epochs": 1,
    "data": {"train_subset": 256},
    "model": {"channels": [16, 32], "attention_heads": 2},
    "train": {"batch_size": 64, "warmup_steps": 2, "preview_steps": 3},
    "sample": {"steps": 5, "batch_size": 100},
    "evaluate": {"num_samples": 20},
    "evaluator": {"epochs": 1, "train_subset": 1000},
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
    from ddpm_core.data import fetch_mnist

    root = tmp_path_factory.mktemp("mnist")
    fetch_mnist(root, MIRROR)
    return root


def clone_project(clone: Path) -> Path:
    """Make `clone` a fresh git repository holding this checkout's files (committed or
    not, without generated data, models or MLflow store), ready for `dvc repro`."""
    shutil.copytree(
        ROOT,
        clone,
        ignore=shutil.ignore_patterns(".git", ".venv", "cache", "data", "models", "mlflow.db*", "mlartifacts", ".ddpm", "__pycache__", "*.egg-info", ".pytest_cache", "tmp"),
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
