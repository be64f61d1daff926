"""Hard inputs and failures: each gives a message naming what is wrong, and leaves no
half-written output behind."""

import dataclasses
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch
import yaml

from conftest import MIRROR, clean_env, tiny_raw
from ddpm_core import tracking
from ddpm_core import train as train_module
from ddpm_core.config import parse_params
from ddpm_core.data import fetch, load_images
from ddpm_core.errors import CheckpointError, DataError, TrackingError, TrainingError
from ddpm_core.files import load_safe, save_atomic, write_text_atomic
from ddpm_core.train import train_diffusion


@contextmanager
def mounted(args, target):
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here (needs root): {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


# --- checkpoints -----------------------------------------------------------------


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ddpm-pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"weights": RunsCode()}, f)
    with pytest.raises(CheckpointError, match=r"evil.pt: refused, not a plain weights file"):
        load_safe(path)
    assert not os.path.exists("/tmp/ddpm-pwned")


def test_truncated_and_missing_checkpoints(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"m.pt: unreadable or truncated checkpoint"):
        load_safe(path)
    with pytest.raises(CheckpointError, match=r"nope.pt: checkpoint not found"):
        load_safe(tmp_path / "nope.pt")


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "m.pt"
    save_atomic({"w": torch.zeros(3)}, path)
    before = path.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"w": Unsaveable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    (tmp_path / "plain").write_bytes(b"x")
    write_text_atomic(tmp_path / "atomic", "x")

    def mode(name):
        return (tmp_path / name).stat().st_mode & 0o777

    assert mode("atomic") == mode("plain")  # not mkstemp's 0600


def test_disk_full_is_an_error_naming_the_file_and_leaves_nothing(tmp_path):
    with mounted(["-t", "tmpfs", "-o", "size=64k", "tmpfs"], tmp_path / "small") as small:
        with pytest.raises(OSError) as info:
            save_atomic({"w": torch.zeros(100_000)}, small / "models" / "uncond.pt")
        assert info.value.filename == str(small / "models" / "uncond.pt")
        assert "No space left" in info.value.strerror
        assert list((small / "models").iterdir()) == []


# --- data ----------------------------------------------------------------------


@pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no MNIST mirror at {MIRROR}")
@pytest.mark.parametrize("data_exists", [False, True])
def test_read_only_data_folder(tmp_path, data_exists):
    read_only = tmp_path / "data" if data_exists else tmp_path
    read_only.mkdir(exist_ok=True)
    with mounted(["--bind", "-o", "ro", str(read_only)], read_only), pytest.raises(DataError) as error:
        fetch("mnist", tmp_path / "data", MIRROR)
    assert (
        str(error.value) == f"{tmp_path / 'data'}: cannot write the dataset (Read-only file system); nothing was kept"
    )
    assert list((tmp_path / "data").iterdir()) == [] if data_exists else not (tmp_path / "data").exists()


# --- training ------------------------------------------------------------------


@pytest.fixture
def nan_after(monkeypatch):
    def install(calls):
        real = train_module.diffusion_loss_terms
        count = {"n": 0}

        def diffusion_loss_terms(*args, **kwargs):
            count["n"] += 1
            terms = real(*args, **kwargs)
            return dataclasses.replace(terms, loss=terms.loss * float("nan")) if count["n"] > calls else terms

        monkeypatch.setattr(train_module, "diffusion_loss_terms", diffusion_loss_terms)

    return install


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(mnist_root, tmp_path, nan_after):
    params = parse_params(tiny_raw(epochs=3, data={"train_subset": 128}))  # 2 steps per epoch
    data = load_images(mnist_root, "mnist", subset=128)
    nan_after(2)  # epoch 1 is fine, epoch 2 diverges at its first step
    resume = tmp_path / "resume.pt"
    with pytest.raises(TrainingError) as info:
        train_diffusion(data, params, False, resume, device=torch.device("cpu"), name="train_uncond")
    message = str(info.value)
    assert "train_uncond: loss became nan in epoch 2 by step 1" in message
    assert f"last good checkpoint: {resume} (epoch 1)" in message
    assert torch.load(resume, weights_only=True)["epoch"] == 1


# --- tracking ------------------------------------------------------------------


def test_unreachable_tracking_server_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    started = time.monotonic()
    with (
        pytest.raises(TrackingError, match=r"MLflow server http://127.0.0.1:9 \(MLFLOW_TRACKING_URI\) is unreachable"),
        tracking.stage_run(tmp_path, "p", "p", "train_uncond", {}, {}),
    ):
        pytest.fail("the stage body must not run")
    assert time.monotonic() - started < 15


def test_a_locked_sqlite_store_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.stage_run(tmp_path, "p1", "first", "fetch_data", {"seed": 0}, {}):
        pass  # creates the store
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(7.0, holder.execute, args=("COMMIT",))  # longer than SQLite's 5 s timeout
    release.start()
    try:
        with tracking.stage_run(tmp_path, "p2", "second", "train_uncond", {"seed": 0}, {}) as run:
            run.log_metrics({"loss": 0.5}, step=1)
    finally:
        release.join()
        holder.close()
    client = tracking.MlflowClient(tracking.tracking_uri(tmp_path))
    (child,) = client.search_runs(
        [client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id], "tags.`ddpm.stage` = 'train_uncond'"
    )
    assert child.data.metrics["loss"] == 0.5


# --- stages as a user runs them ---------------------------------------------------------


def run_stage(clone, script, *args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, f"stages/{script}.py", *args], cwd=clone, env=full_env, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "change,message",
    [
        ({"epochs": "ten"}, "error: params.yaml: epochs = 'ten': Input should be a valid integer"),
        ({"epochs": 0}, "error: params.yaml: epochs = 0: Input should be greater than or equal to 1"),
        (
            {"sample": {"steps": -5}},
            "error: params.yaml: sample.steps = -5: Input should be greater than or equal to 1",
        ),
        (
            {"sample": {"guidance": -1.0}},
            "error: params.yaml: sample.guidance = -1.0: Input should be greater than or equal to 0",
        ),
        (
            {"data": {"train_subset": 70000}},
            "error: params.yaml: data.train_subset = 70000: Input should be less than or equal to 60000",
        ),
        ({"epoch": 3}, "error: params.yaml: unknown key 'epoch' (did you mean 'epochs'?)"),
        ({"sampler": {"steps": 3}}, "error: params.yaml: unknown key 'sampler' (did you mean 'sample'?)"),
        (
            {"sample": {"sampler": "euler"}},
            "error: params.yaml: sample.sampler = 'euler': Input should be 'ddpm', 'ddim' or 'dpmpp2m'",
        ),
        (
            {"diffusion": {"schedule": "sigmoid"}},
            "error: params.yaml: diffusion.schedule = 'sigmoid': Input should be 'linear' or 'cosine'",
        ),
    ],
)
def test_bad_params_stop_a_stage_before_any_work(project_clone, change, message):
    raw = tiny_raw()
    for key, value in change.items():
        if isinstance(value, dict) and key in raw:
            raw[key].update(value)
        else:
            raw[key] = value
    (project_clone / "params.yaml").write_text(yaml.safe_dump(raw))
    (project_clone / "models" / "uncond.pt").write_bytes(b"previous")
    done = run_stage(project_clone, "train", "uncond")
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith(message)
    assert (project_clone / "models" / "uncond.pt").read_bytes() == b"previous"
    assert not (project_clone / "mlflow.db").exists()


def test_missing_param_key_stops_a_stage(project_clone):
    raw = tiny_raw()
    del raw["sample"]["steps"]
    (project_clone / "params.yaml").write_text(yaml.safe_dump(raw))
    done = run_stage(project_clone, "sample")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: params.yaml: missing key 'sample.steps'"


@pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no MNIST mirror at {MIRROR}")
def test_fetch_stage_reports_a_missing_mirror(project_clone):
    done = run_stage(project_clone, "fetch_data", env={"DDPM_DATA_MIRROR": str(project_clone / "no-such-folder")})
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {project_clone / 'no-such-folder'}: DDPM_DATA_MIRROR is not a folder"
    assert not (project_clone / "data" / "dataset").exists()


@pytest.mark.parametrize(
    "mount,reason",
    [
        (["--bind", "-o", "ro"], "Read-only file system"),  # an unwritable models/
        (["-t", "tmpfs", "-o", "size=64k", "tmpfs"], "No space left on device"),  # a full disk
    ],
    ids=["read-only", "disk-full"],
)
def test_unwritable_models_folder_stops_a_stage_naming_the_file(tmp_path, monkeypatch, capsys, mount, reason):
    from conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "stages"))
    import common

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw()))
    monkeypatch.chdir(tmp_path)
    models = tmp_path / "models"
    models.mkdir()
    read_only = "--bind" in mount
    if read_only:
        (models / "uncond.pt").write_bytes(b"previous")
    with mounted([*mount, str(models)] if read_only else mount, models):
        if not read_only:
            (models / "uncond.pt").write_bytes(b"previous")
        with pytest.raises(SystemExit) as exit_info:
            common.main(lambda params: save_atomic({"w": torch.zeros(100_000)}, models / "uncond.pt"))
        assert exit_info.value.code == 1
        assert capsys.readouterr().err.strip() == f"error: {models / 'uncond.pt'}: {reason}"
        assert [p.name for p in models.iterdir()] == ["uncond.pt"]  # no temp file left
        assert (models / "uncond.pt").read_bytes() == b"previous"


@pytest.mark.parametrize("key", ["epoch", "sample.setps"])
def test_dvc_exp_run_refuses_a_mistyped_key(project_clone, key):
    before = (project_clone / "params.yaml").read_bytes()
    env = clean_env()
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", f"{key}=3"],
        cwd=project_clone,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert f"ERROR: Invalid `--set-param` value: Could not override '{key}'." in done.stderr
    assert (project_clone / "params.yaml").read_bytes() == before
    assert not (project_clone / "mlflow.db").exists()


def test_dvc_exp_run_with_a_new_mistyped_key_reaches_the_schema(project_clone):
    # `-S +epoch=3` adds a key DVC doesn't know; only the check_params stage reads the whole file.
    env = clean_env()
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", "+epoch=3", "check_params"],
        cwd=project_clone,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "error: params.yaml: unknown key 'epoch' (did you mean 'epochs'?)" in done.stderr
    assert not (project_clone / "mlflow.db").exists()


def test_mlflow_ui_instructions_bind_to_localhost():
    from conftest import ROOT

    commands = [
        line.strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.strip().startswith(("mlflow ui", "mlflow server"))
    ]
    assert commands, "the README should say how to open the MLflow UI"
    for command in commands:
        assert "--host 127.0.0.1" in command, f"{command!r} would listen beyond this machine"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_in_a_stage_is_one_line_and_exit_128_plus_signal(signum, tmp_path, monkeypatch, capsys):
    from conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "stages"))
    import common

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw()))
    monkeypatch.chdir(tmp_path)

    def interrupted(params):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the signal arrives long before this ends
        raise AssertionError("the signal did not interrupt the stage")

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            common.main(interrupted)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 128 + signum
    assert capsys.readouterr().err.strip() == f"interrupted ({signal.Signals(signum).name})"
