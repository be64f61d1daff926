"""Issue 16, beyond one machine, through the real programs: a PostgreSQL server (Debian's,
run as the postgres user) with an MLflow server over it (tools/team_server.py), a DVC
remote in a local folder, and `dvc exp run -S train.processes=2` (torch.distributed,
gloo). Without PostgreSQL or psycopg these tests skip, unless DDPM_REQUIRE_TEAM=1
(.ci/run) makes that a failure."""

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from conftest import MIRROR, ROOT, clean_env, commit_all, copy_project, tiny_raw
from ddpm_core.distributed import free_port
from ddpm_core.tracking import EXPERIMENT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no MNIST mirror at {MIRROR}")]

TEAM = ROOT / "tools" / "team_server.py"
TRAINED = {"train_uncond", "train_cond", "sample", "evaluate", "plot"}


def _missing() -> str | None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[team]')"
    sys.path.insert(0, str(TEAM.parent))
    import team_server

    try:
        team_server._bindir()
    except team_server.ServerError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def team_server():
    """PostgreSQL + `mlflow server` started as a user would (tools/team_server.py), for this session."""
    missing = _missing()
    if missing:
        if os.environ.get("DDPM_REQUIRE_TEAM") == "1":
            pytest.fail(f"DDPM_REQUIRE_TEAM=1 but {missing}")
        pytest.skip(missing)
    folder = Path(tempfile.mkdtemp(prefix="ddpm-team-"))
    proc = subprocess.run(
        [sys.executable, str(TEAM), "start", "--dir", str(folder), "--port", str(free_port())],
        capture_output=True, text=True, env=clean_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    uri = re.search(r"MLFLOW_TRACKING_URI=(\S+)", proc.stdout).group(1)
    state = yaml.safe_load((folder / "state.json").read_text())
    yield {"uri": uri, "folder": folder, "postgres_port": state["postgres_port"]}
    subprocess.run([sys.executable, str(TEAM), "stop", "--dir", str(folder)], capture_output=True, env=clean_env())
    shutil.rmtree(folder, ignore_errors=True)


def healthy(uri: str) -> bool:
    try:
        return requests.get(f"{uri}/health", timeout=2).ok
    except requests.RequestException:
        return False


def env_with(**extra: str) -> dict[str, str]:
    return {**clean_env(), **extra}


def run_in(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None, ok: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def dvc(*args: str, cwd: Path, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    return run_in([sys.executable, "-m", "dvc", *args], cwd, env, ok)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pipeline(client: MlflowClient, name: str | None = None) -> tuple:
    """(parent run, {stage: child run}) of the named pipeline run, or of the only one."""
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = client.search_runs([experiment_id], "tags.`ddpm.role` = 'pipeline'")
    (parent,) = [p for p in parents if name is None or p.info.run_name == name]
    kids = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, {k.info.run_name: k for k in kids}


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def shape(client: MlflowClient, run) -> dict:
    """What a run records, without the values that differ from run to run."""
    return {
        "params": set(run.data.params),
        "metrics": set(run.data.metrics),
        "tags": {t for t in run.data.tags if not t.startswith("mlflow.")},
        # log_image names each file after its key, step, time and a random id: keep key and step.
        "artifacts": {re.sub(r"\+timestamp\+\d+\+[0-9a-f-]+", "", p) for p in artifact_paths(client, run.info.run_id)},
        "loss_steps": [m.step for m in client.get_metric_history(run.info.run_id, "loss")],
    }


def with_remotes(project: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A bare git repository as `origin` and a local-path DVC remote as the default; the
    project as it is (dvc.lock and the small reports included) committed and pushed."""
    origin, store = tmp_path / "origin.git", tmp_path / "dvc-remote"
    run_in(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    run_in(["git", "remote", "add", "origin", str(origin)], project)
    dvc("remote", "add", "-d", "team", str(store), cwd=project)
    commit_all(project, "remotes")
    branch = run_in(["git", "rev-parse", "--abbrev-ref", "HEAD"], project).stdout.strip()
    run_in(["git", "push", "-q", "origin", f"HEAD:refs/heads/{branch}"], project)
    run_in(["git", "symbolic-ref", "HEAD", f"refs/heads/{branch}"], origin)
    return origin, store


def test_a_two_process_experiment_records_on_the_team_server_what_the_local_store_records_and_travels_by_exp_push(
    tiny_pipeline, tiny_pipeline_copy, team_server, tmp_path
):
    project = tiny_pipeline_copy
    origin, _ = with_remotes(project, tmp_path)
    env = env_with(MLFLOW_TRACKING_URI=team_server["uri"])
    proc = dvc("exp", "run", "-n", "ddp2", "-S", "train.processes=2", cwd=project, env=env)
    assert "train_uncond: 2 processes (torch.distributed" in proc.stdout, proc.stdout[-3000:]

    server = MlflowClient(team_server["uri"])
    parent, stages = pipeline(server, "ddp2")
    assert set(stages) == TRAINED and {r.info.status for r in stages.values()} == {"FINISHED"}
    assert parent.data.params["train.processes"] == "2" and parent.info.status == "FINISHED"
    local = MlflowClient(f"sqlite:///{tiny_pipeline}/mlflow.db")
    _, local_stages = pipeline(local)
    for stage in TRAINED:
        here, there = shape(server, stages[stage]), shape(local, local_stages[stage])
        assert here == there, stage  # the same params, metrics, tags, artifacts and curve points
    for kind in ("uncond", "cond"):
        assert stages[f"train_{kind}"].data.tags["world_size"] == "2"
        assert local_stages[f"train_{kind}"].data.tags["world_size"] == "1"
        # The checkpoint comes back through the server (artifacts are proxied), byte for byte.
        got = server.download_artifacts(stages[f"train_{kind}"].info.run_id, f"checkpoint/{kind}.pt", str(tmp_path))
        assert sha(Path(got)) == sha(project / f"models/{kind}.pt")
    assert list(team_server["folder"].glob("artifacts/*/*/artifacts/checkpoint/uncond.pt"))  # on the server's disk

    # The experiment goes to origin (git) and the DVC remote; a second clone pulls and applies it.
    dvc("exp", "push", "origin", "ddp2", cwd=project)
    other = tmp_path / "other"
    run_in(["git", "clone", "-q", str(origin), str(other)], tmp_path)
    dvc("exp", "pull", "origin", "ddp2", cwd=other)
    assert "ddp2" in dvc("exp", "list", cwd=other).stdout
    dvc("exp", "apply", "ddp2", cwd=other)
    for path in ("models/uncond.pt", "models/cond.pt", "reports/metrics.json"):
        assert sha(other / path) == sha(project / path), path


def test_a_pushed_pipeline_pulls_into_a_second_clone_that_reruns_no_stage(tiny_pipeline_copy, tmp_path):
    project = tiny_pipeline_copy
    origin, store = with_remotes(project, tmp_path)  # commits dvc.lock and the small reports
    dvc("push", cwd=project)

    other = tmp_path / "other"
    run_in(["git", "clone", "-q", str(origin), str(other)], tmp_path)
    # An unreachable remote: one error naming what could not be fetched, exit ≠ 0, no outputs.
    dvc("remote", "modify", "--local", "team", "url", str(tmp_path / "nowhere"), cwd=other)
    proc = dvc("pull", cwd=other, ok=False)
    assert proc.returncode != 0 and "failed to pull data from the cloud" in proc.stderr, proc.stderr
    assert not (other / "models/uncond.pt").exists()
    dvc("remote", "modify", "--local", "team", "url", str(store), cwd=other)

    dvc("pull", cwd=other)
    proc = dvc("repro", cwd=other)
    assert "Running stage" not in proc.stdout, proc.stdout
    assert "Data and pipelines are up to date" in dvc("status", cwd=other).stdout
    for path in ("models/uncond.pt", "models/cond.pt", "models/evaluator.pt", "reports/metrics.json"):
        assert sha(other / path) == sha(project / path), path


def test_a_queued_pair_runs_two_at_a_time_against_the_team_server(tiny_pipeline_copy, team_server):
    from test_reproducibility import wait_for_queue

    project = tiny_pipeline_copy
    env = env_with(MLFLOW_TRACKING_URI=team_server["uri"])
    names = {"team-w3": "sample.guidance=3", "team-w4": "sample.guidance=4"}  # not the default (2)
    for name, override in names.items():
        dvc("exp", "run", "--queue", "-n", name, "-S", override, cwd=project, env=env)
    try:
        dvc("queue", "start", "-j", "2", cwd=project, env=env)
        status = wait_for_queue(project)
    finally:
        dvc("queue", "stop", cwd=project, env=env, ok=False)
    server = MlflowClient(team_server["uri"])
    for name, override in names.items():
        assert re.search(rf"{name}\s.*Success", status), status + dvc("queue", "logs", name, cwd=project).stdout
        parent, stages = pipeline(server, name)
        assert set(stages) == {"sample", "evaluate", "plot"}
        assert {r.info.status for r in stages.values()} == {"FINISHED"} and parent.info.status == "FINISHED"
        assert float(parent.data.params["sample.guidance"]) == float(override.split("=")[1])
        assert "fid_cond" in parent.data.metrics
    assert not list(server.search_runs([server.get_experiment_by_name(EXPERIMENT).experiment_id],
                                       "attributes.status = 'RUNNING'"))  # fmt: skip


def test_a_server_that_dies_mid_training_fails_the_stage_in_one_line_and_the_rerun_resumes(
    tiny_pipeline, team_server, tmp_path
):
    project = copy_project(tiny_pipeline, tmp_path / "project")
    params = tiny_raw(epochs=2, data={"train_subset": 512}, train={"preview_every": 1000})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = sha(project / "models/uncond.pt")
    # A second MLflow server over the same database, to be killed.
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"postgresql://postgres@127.0.0.1:{team_server['postgres_port']}/mlflow",
         "--artifacts-destination", (team_server["folder"] / "artifacts").as_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=clean_env(),
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    killed = False
    try:
        deadline = time.monotonic() + 120
        while not healthy(uri):
            assert time.monotonic() < deadline and server.poll() is None, "the second MLflow server did not start"
            time.sleep(0.5)
        # MLflow retries a failed request for about 4 minutes by default; here at once.
        env = env_with(MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
        stage = subprocess.Popen(
            [sys.executable, "stages/train.py", "uncond"], cwd=project, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for line in stage.stdout:
            if "train_uncond epoch 1:" in line:  # the first epoch is saved
                os.killpg(server.pid, signal.SIGKILL)
                killed = True
                break
        _, err = stage.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    assert killed and not healthy(uri)
    assert stage.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert lines == [lines[-1]] and lines[-1].startswith(
        f"error: MLflow server {uri} (MLFLOW_TRACKING_URI) is unreachable"
    ), err
    assert "since stage train_uncond started" in lines[-1] and "resumes from its last completed epoch" in lines[-1]
    assert sha(project / "models/uncond.pt") == before  # no new weights written
    assert list((project / ".ddpm/resume").glob("train_uncond-*.pt"))

    # Against a server that answers, the same stage resumes after the saved epoch and lands.
    proc = run_in(
        [sys.executable, "stages/train.py", "uncond"], project, env_with(MLFLOW_TRACKING_URI=team_server["uri"])
    )
    assert "train_uncond: resuming after epoch 1" in proc.stdout, proc.stdout
    assert sha(project / "models/uncond.pt") != before


def test_an_unreachable_postgresql_store_or_too_many_processes_stop_a_stage_in_one_line(tiny_pipeline, tmp_path):
    project = copy_project(tiny_pipeline, tmp_path / "project")
    before = sha(project / "models/uncond.pt")
    port = free_port()
    env = env_with(MLFLOW_TRACKING_URI=f"postgresql://postgres:secret@127.0.0.1:{port}/mlflow")
    proc = run_in([sys.executable, "stages/train.py", "uncond"], project, env, ok=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"PostgreSQL at 127.0.0.1:{port}" in lines[0] and "unreachable" in lines[0], proc.stderr
    assert "secret" not in proc.stderr  # the password is not printed

    cores = len(os.sched_getaffinity(0))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["processes"] = cores + 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run_in([sys.executable, "stages/train.py", "uncond"], project, ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: train.processes = {cores + 1}, but this machine has {cores} CPU cores: give at most {cores}, "
        "or start the stage under torchrun across several machines (docs/cluster.md)"
    ]
    assert sha(project / "models/uncond.pt") == before
