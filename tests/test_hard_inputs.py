"""Hard inputs, third round: values the schema used to let through, broken files between
stages, environment variables, full or read-only folders. Each case runs the real stage,
`dvc repro` or `ddpm generate`, and checks the one line, the exit status, and that no
file under models/ or data/samples/ changed (docs/faults.md)."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_faults import mounted

from conftest import clean_env
from ddpm_core.envvars import check_environment
from ddpm_core.errors import ConfigError


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


@pytest.mark.parametrize("variable,value", [("DDPM_THREADS", "abc"), ("DDPM_DEVICE", "tpu"), ("DDPM_CPU_BF16", "yes")])
def test_a_bad_variable_stops_a_stage_and_ddpm_generate(project_clone, variable, value):
    for args in (["stages/check_params.py"], ["-m", "ddpm_core", "generate", "--prompt", "3"]):
        done = run_in(project_clone, *args, env={variable: value})
        assert done.returncode == 2
        assert one_error_line(done).startswith(f"error: {variable}={value!r}: not accepted; accepted: ")
    assert not (project_clone / "generated.png").exists()


# --- params that were let through ----------------------------------------------------


@pytest.mark.parametrize(
    "setting,message",
    [
        ("epochs=true", "error: params.yaml: epochs = True: Input should be a valid integer"),
        ("sample.eta=5", "error: params.yaml: sample.eta = 5: Input should be less than or equal to 1"),
        ("train.preview_steps=5000", "error: params.yaml: train.preview_steps (5000) must be at most"),
    ],
)
def test_dvc_exp_run_stops_at_a_value_the_schema_refuses(project_clone, setting, message):
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", setting, "check_params"],
        cwd=project_clone, env=clean_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode != 0
    assert one_error_line(done).startswith(message)
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
def test_a_broken_sample_file_stops_evaluate_naming_it(tiny_pipeline_copy, case):
    project = tiny_pipeline_copy
    path = project / "data/samples/cond.npz"
    original = path.read_bytes()
    with np.load(path) as f:
        images, labels = f["images"], f["labels"]
    content, why = bad_sample_files(images, labels, original)[case]
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_samples(path, **content)
    before = snapshot(project)
    metrics = (project / "reports/metrics.json").read_bytes()
    done = run_in(project, "stages/evaluate.py")
    assert done.returncode == 1
    n = len(images)
    expected = f"error: data/samples/cond.npz: {why.format(n=n, m=n - 1)}; run `dvc repro --force -s sample`"
    assert one_error_line(done) == expected
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
        ("models/cond_guide.pt", "models/evaluator.pt", "sample",
         "error: models/cond_guide.pt: not the conditional U-Net of model.* in params.yaml (no time_mlp.0.weight"),
        ("models/evaluator.pt", "models/evaluator_alt.pt", "evaluate",
         "error: models/evaluator.pt: not the vgg judge's weights (no "),
        ("models/cond.pt", None, "sample",
         "error: models/cond.pt: unreadable or truncated checkpoint (PytorchStreamReader failed reading zip archive"),
    ],
    ids=["cond-as-uncond", "judge-as-guide", "judge-for-judge", "truncated"],
)  # fmt: skip
def test_a_wrong_checkpoint_stops_the_stage_naming_it(tiny_pipeline_copy, planted, source, stage, message):
    project = tiny_pipeline_copy
    target = project / planted
    if source is None:
        target.write_bytes(target.read_bytes()[:1000])
    else:
        target.write_bytes((project / source).read_bytes())
    before = snapshot(project)
    done = run_in(project, f"stages/{stage}.py")
    assert done.returncode == 1
    assert one_error_line(done).startswith(message)
    assert snapshot(project) == before


def test_non_finite_weights_are_refused(tiny_pipeline_copy):
    project = tiny_pipeline_copy
    state = torch.load(project / "models/uncond.pt")
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key][0] = float("nan")
    torch.save(state, project / "models/uncond.pt")
    done = run_in(project, "stages/sample.py")
    assert done.returncode == 1
    assert one_error_line(done) == (
        f"error: models/uncond.pt: {key} holds NaN or infinite weights; retrain it: `dvc repro --force -s train_uncond`"
    )


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


def test_ddpm_generate_refuses_bad_numbers_and_a_folder_as_output(project_clone):
    cases = [
        (["--guidance", "inf"], "argument --guidance: must be a number from 0 to 20, got 'inf'"),
        (["--guidance", "1e300"], "argument --guidance: must be a number from 0 to 20, got '1e300'"),
        (["--seed", str(2**70)], f"argument --seed: must be a whole number from 0 to 4294967295, got {2**70}"),
        (["--n", "100000"], "argument --n: must be a whole number from 1 to 2000, got 100000"),
        (["--steps", "1e3"], "argument --steps: must be a whole number from 1 to 10000, got '1e3'"),
        (["--out", "."], "error: --out .: a folder; name a file in it, e.g. generated.png"),
    ]
    for args, message in cases:
        done = run_in(project_clone, "-m", "ddpm_core", "generate", "--prompt", "3", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert message in done.stderr.strip().splitlines()[-1], (args, done.stderr)
