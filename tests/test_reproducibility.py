"""Issue 5's promises, through the real `dvc` and the real MLflow store, on tiny params:
the environment on every run, seeds that change and restore the numbers, queued and
temporary experiments in the one store, and kill-and-resume to identical bytes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import MIRROR, clean_env, commit_all, run, tiny_raw
from ddpm_core.environment import sha256_file
from ddpm_core.tracking import EXPERIMENT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no MNIST mirror at {MIRROR}")]

CHECKPOINTS = ("models/uncond.pt", "models/cond.pt")
ENV_KEYS = (
    "python",
    "torch",
    "torchvision",
    "torchmetrics",
    "dvc",
    "mlflow",
    "device",
    "threads",
    "git_revision",
    "params.yaml.sha256",
    "dvc.lock.sha256",
)


def store(project: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    return client, client.get_experiment_by_name(EXPERIMENT).experiment_id


def parent_runs(project: Path) -> dict:
    client, experiment_id = store(project)
    return {r.info.run_name: r for r in client.search_runs([experiment_id], "tags.`ddpm.role` = 'pipeline'")}


def stage_runs(project: Path, parent) -> dict:
    client, experiment_id = store(project)
    return {
        r.info.run_name: r
        for r in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    }


def fingerprint(project: Path) -> dict:
    """What must be identical between two runs of the same params: the checkpoints' bytes and the metrics."""
    return {path: sha256_file(project / path) for path in CHECKPOINTS} | {
        "metrics": json.loads((project / "reports/metrics.json").read_text())
    }


def test_every_run_and_the_report_carry_the_environment(tiny_pipeline):
    (parent,) = parent_runs(tiny_pipeline).values()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tiny_pipeline, capture_output=True, text=True, check=True
    ).stdout.strip()
    params_hash = sha256_file(tiny_pipeline / "params.yaml")
    for run_ in [parent, *stage_runs(tiny_pipeline, parent).values()]:
        tags = run_.data.tags
        missing = [key for key in ENV_KEYS if f"env.{key}" not in tags]
        assert not missing, f"{run_.info.run_name} lacks {missing}"
        assert tags["env.torch"] == version("torch")
        assert tags["env.git_revision"] == head == tags["mlflow.source.git.commit"]
        assert tags["env.params.yaml.sha256"] == params_hash
        assert re.fullmatch(r"[0-9a-f]{64}", tags["env.dvc.lock.sha256"])
    report = (tiny_pipeline / "reports/report.md").read_text()
    for value in (head, params_hash, parent.data.tags["env.torch"], parent.data.tags["env.mlflow"]):
        assert value in report


def assert_landed(project: Path, name: str, stages: set[str]) -> None:
    """Experiment `name` is in `dvc exp show` and is a finished parent run of the store,
    with exactly `stages` as finished stage runs (DVC reran only what the change touches)
    and the final metrics."""
    assert name in run(["dvc", "exp", "show", "--no-pager", "--csv"], project).stdout
    parents = parent_runs(project)
    assert name in parents, f"{name} has no parent run in {project / 'mlflow.db'}: {sorted(parents)}"
    assert parents[name].info.status == "FINISHED"
    children = stage_runs(project, parents[name])
    assert set(children) == stages, f"{name}: {sorted(children)}"
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert "fid_cond" in parents[name].data.metrics


def test_a_new_seed_changes_the_numbers_and_the_old_seed_restores_them(tiny_pipeline_copy):
    project = tiny_pipeline_copy
    original = fingerprint(project)

    # A temporary experiment runs in a copy under .dvc/tmp/exps and still lands here.
    run(["dvc", "exp", "run", "--temp", "-n", "seed-1", "-S", "seed=1"], project)
    assert_landed(project, "seed-1", {"train_uncond", "train_cond", "sample", "evaluate", "plot"})
    assert parent_runs(project)["seed-1"].data.params["seed"] == "1"
    assert fingerprint(project) == original  # --temp leaves the workspace alone
    run(["dvc", "exp", "apply", "seed-1"], project)
    reseeded = fingerprint(project)
    for path in CHECKPOINTS:
        assert reseeded[path] != original[path]
    assert reseeded["metrics"]["fid_cond"] != original["metrics"]["fid_cond"]

    # Without DVC's run cache the stages really recompute instead of restoring old outputs.
    shutil.rmtree(project / ".dvc/cache/runs")
    proc = run(["dvc", "exp", "run", "-n", "seed-0-again", "-S", "seed=0"], project)
    assert "Running stage 'train_uncond'" in proc.stdout and "Running stage 'sample'" in proc.stdout
    assert fingerprint(project) == original


def wait_for_queue(project: Path, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], project).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(5)
    raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")


def test_two_queued_experiments_at_once_both_land_in_one_new_store(tiny_pipeline_copy):
    project = tiny_pipeline_copy
    # No store yet: the two workers' first stages race to create its tables.
    (project / "mlflow.db").unlink()
    shutil.rmtree(project / "mlartifacts")
    # Two cheap experiments (sampling onwards): the race is over the store, not the work.
    experiments = {
        "q-guidance": ("sample.guidance=1.0", {"sample", "evaluate", "plot"}),
        "q-steps": ("sample.steps=4", {"sample", "evaluate", "plot"}),
    }
    for name, (override, _) in experiments.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", override], project)
    try:
        run(["dvc", "queue", "start", "-j", "2"], project)
        status = wait_for_queue(project)
    finally:
        subprocess.run(
            [sys.executable, "-m", "dvc", "queue", "stop"], cwd=project, env=clean_env(), capture_output=True
        )
    for name, (override, stages) in experiments.items():
        assert re.search(rf"{name}\s.*Success", status), (
            status + run(["dvc", "queue", "logs", name], project).stdout[-4000:]
        )
        assert_landed(project, name, stages)
        key, value = override.split("=")
        assert float(parent_runs(project)[name].data.params[key]) == float(value)
        log = run(["dvc", "queue", "logs", name], project).stdout
        assert "database is locked" not in log and "Traceback" not in log


# --- kill and resume ---------------------------------------------------------------------

EPOCHS = 4


def start_repro(project: Path) -> subprocess.Popen:
    """`dvc repro train_uncond` in its own process group, as a terminal would run it."""
    return subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "train_uncond"], cwd=project, env=clean_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def interrupt_after(proc: subprocess.Popen, line: str, signum: int) -> str:
    """Read the output until `line` (an epoch is saved), then signal the whole group."""
    seen = []
    for out in proc.stdout:
        seen.append(out)
        if line in out:
            time.sleep(0.5)  # into the next epoch
            os.killpg(proc.pid, signum)
            break
    rest = proc.communicate(timeout=120)[0]
    return "".join(seen) + rest


def test_kill_and_resume_through_dvc_repro_ends_with_the_uninterrupted_bytes(project_clone):
    project = project_clone
    params = tiny_raw(epochs=EPOCHS, data={"train_subset": 640}, train={"preview_steps": 2})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(project, "kill params")
    resume = project / ".ddpm" / "resume"

    # Ctrl-C in epoch 2, SIGTERM in epoch 3, SIGKILL in epoch 4; each rerun resumes.
    for epoch, signum in enumerate((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), start=1):
        proc = start_repro(project)
        output = interrupt_after(proc, f"train_uncond epoch {epoch}:", signum)
        assert proc.returncode != 0, output
        if epoch > 1:
            assert f"train_uncond: resuming after epoch {epoch - 1}" in output, output
        if signum != signal.SIGKILL:
            assert f"interrupted ({signal.Signals(signum).name})" in output, output
            assert "resumes from the last completed epoch" in output, output
        assert len(list(resume.glob("train_uncond-*.pt"))) == 1, output
    proc = start_repro(project)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert f"train_uncond: resuming after epoch {EPOCHS - 1}" in output, output
    assert not list(resume.glob("*.pt")), "a finished run leaves no resume state"
    resumed = {
        "weights": sha256_file(project / "models/uncond.pt"),
        "losses": (project / "reports/loss_uncond.csv").read_text(),
    }

    # The runs killed mid-stage are marked so in MLflow, not left RUNNING.
    client, experiment_id = store(project)
    statuses = sorted(r.info.status for r in client.search_runs([experiment_id], "tags.`ddpm.stage` = 'train_uncond'"))
    assert statuses == ["FINISHED", "KILLED", "KILLED", "KILLED"]
    # The finished run has the whole curve, the part logged before each interruption included.
    (finished,) = client.search_runs(
        [experiment_id], "tags.`ddpm.stage` = 'train_uncond' AND attributes.status = 'FINISHED'"
    )
    steps = [int(line.split(",")[0]) for line in resumed["losses"].splitlines()[1:]]
    assert [m.step for m in client.get_metric_history(finished.info.run_id, "loss")] == steps

    # The same training, uninterrupted.
    env = clean_env()
    subprocess.run([sys.executable, "stages/train.py", "uncond"], cwd=project, env=env, check=True, capture_output=True)
    assert {
        "weights": sha256_file(project / "models/uncond.pt"),
        "losses": (project / "reports/loss_uncond.csv").read_text(),
    } == resumed
    # 640 images at batch 64: 10 steps per epoch, a point every log_every (2) steps.
    assert [int(r.split(",")[0]) for r in resumed["losses"].splitlines()[1:]] == list(range(2, 10 * EPOCHS + 1, 2))
