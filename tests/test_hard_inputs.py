"""Hard inputs, third round: values the schema used to let through, broken files between
stages, environment variables, full or read-only folders. Each case runs the real stage,
`dvc repro` or `ddpm generate`, and checks the one line, the exit status, and that no
file under models/ or data/samples/ changed (docs/faults.md)."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_faults import mounted

from conftest import clean_env
from ddpm_core.cli import main as cli_main
from ddpm_core.data import load_images
from ddpm_core.envvars import check_environment
from ddpm_core.errors import CheckpointError, ConfigError, DataError
from ddpm_core.evaluation import ARCHITECTURES, load_classifier
from ddpm_core.files import read_json, read_table
from ddpm_core.generation import load_labelled_samples, load_unet, save_samples
from ddpm_core.unet import build_unet


def snapshot(project: Path) -> dict[str, str]:
    """md5 of every file under models/ and data/samples/."""
    files = [p for d in ("models", "data/samples") for p in sorted((project / d).rglob("*")) if p.is_file()]
    return {str(p.relative_to(project)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


def run_in(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = clean_env()
    full["DDPM_THREADS"] = "1"
    full.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=project, env=full, capture_output=True, text=True)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The stage's `error:` line; no traceback anywhere."""
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


# --- environment variables ----------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"DDPM_THREADS": "2"},
        {"OMP_NUM_THREADS": "1", "DDPM_CPU_BF16": "0"},
        {"DDPM_DEVICE": "cpu"},
        {"DDPM_THREADS": ""},
    ],
)
def test_good_environment_values_pass(environ):
    check_environment(environ)


@pytest.mark.parametrize(
    "environ,message",
    [
        (
            {"DDPM_THREADS": "abc"},
            "DDPM_THREADS='abc': not accepted; accepted: a whole number of threads from 1 to 1024",
        ),
        ({"DDPM_THREADS": "0"}, "DDPM_THREADS='0': not accepted"),
        ({"DDPM_THREADS": "2", "OMP_NUM_THREADS": "-1"}, "OMP_NUM_THREADS='-1': not accepted"),
        ({"DDPM_DEVICE": "tpu"}, "DDPM_DEVICE='tpu': not accepted; accepted: cpu, cuda, cuda:N (N a GPU index) or mps"),
        ({"DDPM_DEVICE": "cuda:x"}, "DDPM_DEVICE='cuda:x': not accepted"),
        ({"DDPM_DEVICE": "cpu:0"}, "DDPM_DEVICE='cpu:0': not accepted"),
        (
            {"DDPM_CPU_BF16": "yes"},
            "DDPM_CPU_BF16='yes': not accepted; accepted: 0 (fp32 on the CPU) or 1 (bf16 autocast)",
        ),
    ],
)
def test_bad_environment_values_name_the_variable(environ, message):
    with pytest.raises(ConfigError) as info:
        check_environment(environ)
    assert str(info.value).startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_refused():
    with pytest.raises(ConfigError) as info:
        check_environment({"DDPM_DEVICE": "cuda"})
    assert str(info.value).startswith("DDPM_DEVICE='cuda': this machine has 0 CUDA device(s)")


def test_a_bad_variable_stops_a_stage_and_ddpm_generate(project_clone):
    for args, (variable, value) in (
        (["stages/check_params.py"], ("DDPM_THREADS", "abc")),
        (["-m", "ddpm_core", "generate", "--prompt", "3"], ("DDPM_DEVICE", "tpu")),
    ):
        done = run_in(project_clone, *args, env={variable: value})
        assert done.returncode == 2
        assert one_error_line(done).startswith(f"error: {variable}={value!r}: not accepted; accepted: ")
    assert not (project_clone / "generated.png").exists()


# --- params that were let through ----------------------------------------------------


def test_dvc_exp_run_stops_at_a_boolean_for_a_number(project_clone):
    # the other values the schema now refuses: tests/test_config.py::test_numbers_are_finite_bounded_and_not_booleans
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", "epochs=true", "check_params"],
        cwd=project_clone, env=clean_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode != 0
    assert one_error_line(done) == "error: params.yaml: epochs = True: Input should be a valid integer"
    assert not any((project_clone / "models").iterdir())


def test_dvc_repro_stops_at_an_infinite_guidance_before_any_stage_writes(project_clone):
    params = project_clone / "params.yaml"
    params.write_text(params.read_text().replace("  guidance: 2.0 ", "  guidance: .inf "))
    done = run_in(project_clone, "-m", "dvc", "repro")
    assert done.returncode != 0
    assert one_error_line(done) == "error: params.yaml: sample.guidance = inf: Input should be a finite number"
    assert not any((project_clone / "models").iterdir())
    assert not (project_clone / "data/samples").exists()


# --- files between stages ---------------------------------------------------------------


def write_samples(path: Path, **arrays) -> None:
    with path.open("wb") as f:
        np.savez(f, **arrays)


def bad_sample_files(images: np.ndarray, labels: np.ndarray, original: bytes) -> dict:
    return {
        "float images": ({"images": images.astype(np.float32) / 255, "labels": labels},
                         "images are float32 {n}×28×28, expected uint8 N×28×28"),
        "wrong size": ({"images": np.zeros((len(images), 32, 32), np.uint8), "labels": labels},
                       "images are uint8 {n}×32×32, expected uint8 N×28×28"),
        "labels out of range": ({"images": images, "labels": labels + 10}, "labels run from 10 to 19, expected classes 0 to 9"),
        "fewer labels": ({"images": images, "labels": labels[:-1]}, "labels are int64 {m}, expected {n} integers, one per image"),
        "no labels": ({"images": images}, "no labels in it"),
        "fewer images": ({"images": images[:5], "labels": labels[:5]}, "5 images, where the params ask for {n}"),
        "truncated": (original[: len(original) // 2], "not a readable .npz of samples (File is not a zip file)"),
        "not an npz": (b"hello", "not a readable .npz of samples (not an .npz archive)"),
    }  # fmt: skip


def plant(path: Path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_samples(path, **content)


@pytest.fixture(scope="module")
def real_samples(tmp_path_factory) -> tuple[np.ndarray, np.ndarray, bytes]:
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20) % 10
    path = tmp_path_factory.mktemp("samples") / "cond.npz"
    save_samples(path, torch.from_numpy(images)[:, None], torch.from_numpy(labels))
    return images, labels, path.read_bytes()


CASES = [
    "float images",
    "wrong size",
    "labels out of range",
    "fewer labels",
    "no labels",
    "fewer images",
    "truncated",
    "not an npz",
]


@pytest.mark.parametrize("case", CASES)
def test_a_broken_sample_file_is_one_error_naming_it(tmp_path, real_samples, case):
    images, labels, original = real_samples
    path = tmp_path / "cond.npz"
    content, why = bad_sample_files(images, labels, original)[case]
    plant(path, content)
    with pytest.raises(DataError) as info:
        load_labelled_samples(path, count=len(images))
    n = len(images)
    assert str(info.value) == f"{path}: {why.format(n=n, m=n - 1)}; run `dvc repro --force -s sample`"


@pytest.mark.parametrize("case", ["float images", "truncated"])
def test_a_broken_sample_file_stops_the_evaluate_stage(tiny_pipeline_copy, case):
    project = tiny_pipeline_copy
    path = project / "data/samples/cond.npz"
    original = path.read_bytes()
    with np.load(path) as f:
        images, labels = f["images"], f["labels"]
    content, why = bad_sample_files(images, labels, original)[case]
    plant(path, content)
    before = snapshot(project)
    metrics = (project / "reports/metrics.json").read_bytes()
    done = run_in(project, "stages/evaluate.py")
    assert done.returncode == 1
    n = len(images)
    assert one_error_line(done) == f"error: data/samples/cond.npz: {why.format(n=n)}; run `dvc repro --force -s sample`"
    assert snapshot(project) == before
    assert (project / "reports/metrics.json").read_bytes() == metrics


def test_a_mixed_up_checkpoint_under_dvc_repro_keeps_the_previous_samples(tiny_pipeline_copy):
    project = tiny_pipeline_copy
    (project / "models/cond.pt").write_bytes((project / "models/uncond.pt").read_bytes())
    before = snapshot(project)
    # DVC deletes data/samples before it runs the stage; the failed stage puts it back.
    done = run_in(project, "-m", "dvc", "repro", "-s", "sample")
    assert done.returncode != 0
    assert one_error_line(done) == (
        "error: models/cond.pt: holds an unconditional model's weights where a conditional one belongs; "
        "retrain it: `dvc repro --force -s train_cond`"
    )
    assert snapshot(project) == before


@pytest.mark.parametrize(
    "planted,source,stage,message",
    [
        ("models/uncond.pt", "models/cond.pt", "sample",
         "error: models/uncond.pt: holds a conditional model's weights where an unconditional one belongs; "
         "retrain it: `dvc repro --force -s train_uncond`"),
        ("models/evaluator.pt", "models/evaluator_alt.pt", "evaluate",
         "error: models/evaluator.pt: not the vgg judge's weights (no "),
    ],
    ids=["cond-as-uncond", "judge-for-judge"],
)  # fmt: skip
def test_a_wrong_checkpoint_stops_the_stage_naming_it(tiny_pipeline_copy, planted, source, stage, message):
    project = tiny_pipeline_copy
    (project / planted).write_bytes((project / source).read_bytes())
    before = snapshot(project)
    done = run_in(project, f"stages/{stage}.py")
    assert done.returncode == 1
    assert one_error_line(done).startswith(message)
    assert snapshot(project) == before


@pytest.fixture
def weights(tmp_path, tiny_params) -> dict[str, Path]:
    """Untrained weights of both U-Nets and both judges, as the stages save them."""
    files = {}
    for name, model in (
        ("cond", build_unet(tiny_params.model, 10)),
        ("uncond", build_unet(tiny_params.model, None)),
        ("vgg", ARCHITECTURES["vgg"]()),
        ("residual", ARCHITECTURES["residual"]()),
        ("other widths", build_unet(tiny_params.model.model_copy(update={"channels": [8, 16]}), None)),
    ):
        files[name] = tmp_path / f"{name}.pt"
        torch.save(model.state_dict(), files[name])
    return files


def test_every_wrong_checkpoint_is_one_error_naming_it(tmp_path, tiny_params, weights):
    def unet_error(path: Path, conditional: bool) -> str:
        with pytest.raises(CheckpointError) as info:
            load_unet(path, tiny_params.model, conditional, torch.device("cpu"))
        return str(info.value)

    retrain = "retrain it: `dvc repro --force -s train_cond`"
    assert unet_error(weights["uncond"], True) == (
        f"{weights['uncond']}: holds an unconditional model's weights where a conditional one belongs; {retrain}"
    )
    assert unet_error(weights["vgg"], True).startswith(
        f"{weights['vgg']}: not the conditional U-Net of model.* in params.yaml (no time_mlp.0.weight and "
    )
    assert " is 32×8, expected 64×16); " in unet_error(weights["other widths"], False)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights["cond"].read_bytes()[:1000])
    assert unet_error(truncated, True) == (
        f"{truncated}: unreadable or truncated checkpoint (PytorchStreamReader failed reading zip archive: "
        f"failed finding central directory); {retrain}"
    )
    state = torch.load(weights["cond"])
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    assert (
        unet_error(tmp_path / "nan.pt", True)
        == f"{tmp_path / 'nan.pt'}: {key} holds NaN or infinite weights; {retrain}"
    )
    torch.save([1, 2], tmp_path / "list.pt")
    assert (
        unet_error(tmp_path / "list.pt", True)
        == f"{tmp_path / 'list.pt'}: not a state_dict of tensors (list); {retrain}"
    )
    assert unet_error(tmp_path, True) == f"{tmp_path}: a folder, not a checkpoint; {retrain}"
    with pytest.raises(CheckpointError) as info:
        load_classifier(weights["residual"], "vgg")
    assert str(info.value).startswith(f"{weights['residual']}: not the vgg judge's weights (no ")
    assert str(info.value).endswith("; retrain the judges: `dvc repro --force -s train_evaluator`")
    load_unet(weights["cond"], tiny_params.model, True, torch.device("cpu"))  # the right file still loads
    load_classifier(weights["vgg"], "vgg")


def test_reports_of_other_stages_are_read_with_errors_naming_the_file(tmp_path):
    remedy = "run `dvc repro --force -s evaluate`"
    path = tmp_path / "metrics.json"
    for text, why in (
        ("{bad", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        ("[1]", "a JSON list, expected an object"),
    ):
        path.write_text(text)
        with pytest.raises(DataError) as info:
            read_json(path, remedy)
        assert str(info.value) == f"{path}: {why}; {remedy}"
    path.write_text(json.dumps({"fid_floor": 1.0, "guidance_sweep": {"rows": [{"guidance": 1}]}}))
    metrics = read_json(path, remedy)
    assert metrics["fid_floor"] == 1.0 and metrics["guidance_sweep"]["rows"][0]["guidance"] == 1
    for lookup in (lambda: metrics["fid_uncond"], lambda: metrics["guidance_sweep"]["fid_floor"]):
        with pytest.raises(DataError) as info:
            lookup()
        assert str(info.value).startswith(f"{path}: no '") and str(info.value).endswith(f"' in it; {remedy}")
    assert metrics.get("fid_uncond") is None  # an optional key stays optional
    table = tmp_path / "loss.csv"
    table.write_text("x\n1\n")
    with pytest.raises(DataError) as info:
        read_table(table, ("step", "epoch", "loss"), remedy)
    assert str(info.value) == f"{table}: no column step, epoch, loss (it has x); {remedy}"


def test_a_broken_report_stops_the_plot_stage_before_it_writes(tiny_pipeline_copy):
    project = tiny_pipeline_copy
    metrics = json.loads((project / "reports/metrics.json").read_text())
    del metrics["fid_uncond"]
    (project / "reports/metrics.json").write_text(json.dumps(metrics))
    outputs = sorted((project / "reports").rglob("*"))
    before = {p: p.read_bytes() for p in outputs if p.is_file()}
    done = run_in(project, "stages/plot.py")
    assert done.returncode == 1
    assert one_error_line(done) == (
        "error: reports/metrics.json: no 'fid_uncond' in it; run `dvc repro --force -s evaluate`"
    )
    assert {p: p.read_bytes() for p in outputs if p.is_file()} == before


def test_a_damaged_dataset_file_is_one_error_naming_the_folder(mnist_root, tmp_path):
    shutil.copytree(mnist_root, tmp_path / "dataset")
    raw = tmp_path / "dataset/MNIST/raw"
    images = raw / "t10k-images-idx3-ubyte"
    remedy = "run `dvc repro --force -s fetch_data`"
    for damage, why in (
        (
            lambda: images.write_bytes(images.read_bytes()[:5000]),
            "shape '[10000, 28, 28]' is invalid for input of size 4984",
        ),
        (lambda: images.write_bytes(b"garbage"), "AssertionError"),
        (lambda: images.unlink(), "Dataset not found. You can use download=True to download it"),
    ):
        damage()
        with pytest.raises(DataError) as info:
            load_images(tmp_path / "dataset", "mnist", train=False)
        assert str(info.value) == f"{raw}: the test files are missing or damaged ({why}); {remedy}"
    shutil.copy(mnist_root / "MNIST/raw/t10k-images-idx3-ubyte", images)
    assert len(load_images(tmp_path / "dataset", "mnist", train=False, subset=10).images) == 10  # whole again


# --- full and read-only folders -----------------------------------------------------


@pytest.mark.parametrize("fault", ["read-only", "disk-full"])
def test_a_fault_while_the_sample_stage_writes_keeps_the_previous_samples(tiny_pipeline_copy, tmp_path, fault):
    project = tiny_pipeline_copy
    samples = project / "data/samples"
    kept = tmp_path / "kept"
    kept.mkdir()
    for p in samples.rglob("*"):
        if p.is_file():
            (kept / p.relative_to(samples)).parent.mkdir(parents=True, exist_ok=True)
            (kept / p.relative_to(samples)).write_bytes(p.read_bytes())
    before = snapshot(project)
    mount = ["--bind", "-o", "ro", str(kept)] if fault == "read-only" else ["-t", "tmpfs", "-o", "size=512k", "tmpfs"]
    with mounted(mount, samples):
        if fault == "disk-full":
            for p in kept.rglob("*"):
                if p.is_file():
                    (samples / p.relative_to(kept)).parent.mkdir(parents=True, exist_ok=True)
                    (samples / p.relative_to(kept)).write_bytes(p.read_bytes())
            with (samples / ".filler").open("wb", buffering=0) as f:  # take what space is left
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
        done = run_in(project, "stages/sample.py")
        if fault == "disk-full":
            (samples / ".filler").unlink()
        assert done.returncode == 1
        reason = "Read-only file system" if fault == "read-only" else "No space left on device"
        line = one_error_line(done)
        assert line.startswith("error: data/samples/") and line.endswith(f": {reason}"), line
        assert snapshot(project) == before
        assert not [p for p in samples.rglob(".*.tmp")]  # no temp file left


@pytest.mark.parametrize(
    "args,message",
    [
        (["--guidance", "inf"], "argument --guidance: must be a number from 0 to 20, got 'inf'"),
        (["--guidance", "1e300"], "argument --guidance: must be a number from 0 to 20, got '1e300'"),
        (["--seed", str(2**70)], f"argument --seed: must be a whole number from 0 to 4294967295, got {2**70}"),
        (["--n", "100000"], "argument --n: must be a whole number from 1 to 2000, got 100000"),
        (["--n", "300", "--prompt", "0 1 2 3 4 5 6 7"], "error: --n 300 for each of 8 classes is 2400 images; give at most 2000 in all"),
        (["--steps", "1e3"], "argument --steps: must be a whole number from 1 to 10000, got '1e3'"),
        (["--out", "."], "error: --out .: a folder; name a file in it, e.g. generated.png"),
    ],
)  # fmt: skip
def test_ddpm_generate_refuses_bad_numbers_and_a_folder_as_output(project_clone, monkeypatch, capsys, args, message):
    monkeypatch.chdir(project_clone)
    if "--prompt" not in args:
        args = ["--prompt", "3", *args]
    with pytest.raises(SystemExit) as info:
        cli_main(["generate", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (project_clone / "generated.png").exists()
