"""`ddpm generate` and the denoising animation. Untrained weights are enough here: what
is checked is determinism, shapes and frame counts, not how the digits look."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from conftest import clean_env, tiny_raw
from ddpm_core.animation import FRAME_MS, LAST_FRAME_MS, FrameRecorder, gif_size
from ddpm_core.cli import FALLBACK_SAMPLE, main
from ddpm_core.config import parse_params
from ddpm_core.samplers import DPMSolverPPSampler, sample, trailing_timesteps
from ddpm_core.schedule import make_schedule
from ddpm_core.unet import build_unet

STEPS = 5  # tiny_raw's sample.steps


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with tiny params.yaml (autoguidance off) and random weights in models/, the
    models' and their autoguidance guides', as the working directory."""
    raw = tiny_raw(sample={"autoguidance_cond": 1.0, "autoguidance_uncond": 1.0})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw)
    (tmp_path / "models").mkdir()
    for kind, classes in (("cond", 10), ("uncond", None)):
        torch.manual_seed(0)
        torch.save(build_unet(params.model, classes).state_dict(), tmp_path / "models" / f"{kind}.pt")
        # The guide: other weights, perturbed (an untrained U-Net's zero last layer outputs zeros).
        guide = build_unet(params.model, classes)
        with torch.no_grad():
            for p in guide.parameters():
                p.add_(0.02 * torch.randn_like(p))
        torch.save(guide.state_dict(), tmp_path / "models" / f"{kind}_guide.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def generate(*args: str) -> None:
    main(["generate", *args])


def grid_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) of a grid of 28-px images with 2-px padding."""
    return columns * 30 + 2, rows * 30 + 2


def test_same_seed_same_png_other_seed_other_png(project, capsys):
    for name, seed in (("a.png", "0"), ("b.png", "0"), ("c.png", "1")):
        generate("--prompt", "Three, 1", "--n", "2", "--seed", seed, "--out", name)
    a, b, c = ((project / n).read_bytes() for n in ("a.png", "b.png", "c.png"))
    assert a == b
    assert a != c
    with Image.open(project / "a.png") as image:
        assert image.size == grid_size(rows=2, columns=2)
    assert (
        "wrote a.png: 4 images (digits 3 1, guidance 2; dpmpp2m, 5 steps, seed 0; models/cond.pt)"
        in capsys.readouterr().out
    )


def test_animate_writes_steps_plus_one_frames_and_the_same_png(project):
    generate("--prompt", "3 1", "--n", "3", "--out", "plain.png")
    generate("--prompt", "3 1", "--n", "3", "--out", "animated.png", "--animate", "steps.gif")
    assert (project / "plain.png").read_bytes() == (project / "animated.png").read_bytes()
    with Image.open(project / "steps.gif") as gif:
        assert gif.n_frames == STEPS + 1
        assert gif.size == gif_size((grid_size(2, 3)[1], grid_size(2, 3)[0]))
        assert gif.info["loop"] == 0
        durations = []
        for k in range(gif.n_frames):
            gif.seek(k)
            durations.append(gif.info["duration"])
    assert durations == [FRAME_MS] * STEPS + [LAST_FRAME_MS]


def test_unconditional_grid_is_ten_wide(project):
    generate("--unconditional", "--n", "12", "--sampler", "ddim", "--steps", "2", "--out", "u.png")
    with Image.open(project / "u.png") as image:
        assert image.size == grid_size(rows=2, columns=10)


def test_recording_sees_every_step_and_changes_nothing():
    schedule = make_schedule("linear", 100)
    torch.manual_seed(0)
    net = nn.Conv2d(1, 1, 3, padding=1)
    model = lambda x, t, labels: torch.tanh(net(x))  # noqa: E731
    shape = (3, 1, 28, 28)
    plain = sample(model, DPMSolverPPSampler(schedule, 7), shape, torch.Generator().manual_seed(0))
    recorder = FrameRecorder(steps=7, nrow=3, show="x0")
    watched = sample(model, DPMSolverPPSampler(schedule, 7), shape, torch.Generator().manual_seed(0), on_step=recorder)
    assert torch.equal(plain, watched)
    assert len(recorder.frames) == 8 and recorder.frames[0].shape == (32, 92)
    # DDPM's T steps are thinned, first and last kept.
    thinned = FrameRecorder(steps=1000, nrow=1)
    assert len(thinned.keep) == 101 and {0, 1000} <= thinned.keep


def run_cli(cwd, *args):
    return subprocess.run(
        [sys.executable, "-m", "ddpm_core", "generate", *args], cwd=cwd, env=clean_env(), capture_output=True, text=True
    )


def run_clis(cwd, calls: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """`run_cli` for each argument list, two at a time: each spends seconds importing."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda args: run_cli(cwd, *args), calls))


def test_unknown_prompt_is_one_line_listing_the_words(tmp_path):
    proc = run_cli(tmp_path, "--prompt", "3 eleven")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown class 'eleven'; accepted: 0-9 or zero, one, two, three, four, five, six, seven, eight, nine"
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--prompt", "7"],
            "error: models/cond.pt: not found; train it with `dvc repro train_cond`, or load one from MLflow with --run-id or --model",
        ),
        (
            ["--unconditional"],
            "error: models/uncond.pt: not found; train it with `dvc repro train_uncond`, or load one from MLflow with --run-id or --model",
        ),
        (["--unconditional", "--prompt", "7"], "error: --unconditional draws any class; leave out --prompt"),
    ],
)
def test_user_errors_are_one_line(project, capsys, args, message):
    for model in (project / "models").iterdir():
        model.unlink()
    with pytest.raises(SystemExit) as exit_info:
        generate(*args)
    assert exit_info.value.code != 0
    assert capsys.readouterr().err.strip().splitlines() == [message]


def test_autoguidance_samples_with_the_guide_file(project, capsys):
    args = ("--unconditional", "--n", "4")
    generate(*args, "--out", "plain.png")
    generate(*args, "--autoguidance", "1", "--out", "one.png")
    generate(*args, "--autoguidance", "2", "--out", "a.png")
    generate(*args, "--autoguidance", "2", "--out", "b.png")
    plain, one, a, b = ((project / n).read_bytes() for n in ("plain.png", "one.png", "a.png", "b.png"))
    assert plain == one and a == b and a != plain
    out = capsys.readouterr().out
    assert "wrote one.png: 4 images (unconditional; dpmpp2m" in out
    assert "wrote a.png: 4 images (unconditional, autoguidance 2; dpmpp2m, 5 steps, seed 0; models/uncond.pt)" in out
    # Weight 0 is the guide alone: the image of the guide's weights sampled as the model.
    generate(*args, "--autoguidance", "0", "--out", "guide_alone.png")
    shutil.copy(project / "models" / "uncond_guide.pt", project / "models" / "uncond.pt")
    generate(*args, "--out", "guide_as_model.png")
    assert (project / "guide_alone.png").read_bytes() == (project / "guide_as_model.png").read_bytes()
    generate("--prompt", "3 1", "--n", "2", "--autoguidance", "1.5", "--out", "c.png")
    assert "wrote c.png: 4 images (digits 3 1, guidance 2, autoguidance 1.5; dpmpp2m" in capsys.readouterr().out


def test_guidance_interval_is_named_and_must_hold_a_step(project, capsys):
    generate("--prompt", "3", "--n", "2", "--guidance-interval", "0:999", "--out", "a.png")
    assert "wrote a.png: 2 images (digits 3, guidance 2 at t in [0, 999]; dpmpp2m" in capsys.readouterr().out
    generate("--prompt", "3", "--n", "2", "--guidance-interval", "all", "--out", "b.png")
    assert "wrote b.png: 2 images (digits 3, guidance 2; dpmpp2m" in capsys.readouterr().out
    visited = trailing_timesteps(1000, STEPS, 10).tolist()
    gap = (visited[-1] + 1, visited[-2] - 1)  # between the last two steps
    with pytest.raises(SystemExit) as exit_info:
        generate("--prompt", "3", "--guidance-interval", f"{gap[0]}:{gap[1]}")
    assert exit_info.value.code != 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: guidance interval {gap[0]}:{gap[1]} holds none of the sampler's timesteps "
        f"({', '.join(map(str, visited))}): guidance would never apply; widen it, or give --guidance-interval all"
    ]
    for bad in ("340:0", "a:b", "10"):
        with pytest.raises(SystemExit):
            generate("--prompt", "3", "--guidance-interval", bad)
        assert "must be LO:HI, two timesteps with LO ≤ HI" in capsys.readouterr().err


def test_autoguidance_without_its_guide_is_one_line_naming_the_file(project, capsys):
    for kind in ("cond", "uncond"):
        (project / "models" / f"{kind}_guide.pt").unlink()
    for args, kind, weight in (
        (["--prompt", "7", "--autoguidance", "2"], "cond", "2"),
        (["--unconditional", "--autoguidance", "0.5"], "uncond", "0.5"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            generate(*args)
        assert exit_info.value.code == 1
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: models/{kind}_guide.pt: not found; autoguidance {weight} needs the guide: "
            f"train it with `dvc repro train_{kind}`, or give --autoguidance 1"
        ]
    # params.yaml's weight needs the guide too; weight 1 does without.
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["sample"]["autoguidance_cond"] = 3.0
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit):
        generate("--prompt", "7")
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: models/cond_guide.pt: not found; autoguidance 3 needs the guide: "
        "train it with `dvc repro train_cond`, or give --autoguidance 1"
    ]
    generate("--prompt", "7", "--autoguidance", "1", "--out", "plain.png")
    assert (project / "plain.png").exists()


@pytest.mark.parametrize("weight", ["-1", "inf", "nan"])
def test_the_autoguidance_weight_is_finite_and_not_negative(project, capsys, weight):
    with pytest.raises(SystemExit) as exit_info:
        generate("--prompt", "7", "--autoguidance", weight)
    assert exit_info.value.code == 2
    assert f"argument --autoguidance: must be a number from 0 to 20, got {weight!r}" in capsys.readouterr().err


def test_a_registered_model_brings_its_guide(project, capsys, monkeypatch):
    """--model models:/ddpm-mnist-cond/latest: the newest version, with the guide logged in it."""
    from ddpm_core import tracking
    from ddpm_core.config import flatten

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = flatten(parse_params(yaml.safe_load((project / "params.yaml").read_text())))
    models = project / "models"
    with tracking.stage_run(project, "p", "p", "train_cond", params, params) as run:
        run.log_model("cond", models / "cond.pt", params, {}, guide=models / "cond_guide.pt")
    args = ("--prompt", "3 1", "--n", "2")
    generate(*args, "--autoguidance", "2", "--out", "local.png")
    generate(*args, "--autoguidance", "2", "--model", "models:/ddpm-mnist-cond/latest", "--out", "registered.png")
    assert (project / "local.png").read_bytes() == (project / "registered.png").read_bytes()
    assert "autoguidance 2; dpmpp2m, 5 steps, seed 0; models:/ddpm-mnist-cond/latest)" in capsys.readouterr().out

    # A newer version logged without a guide: refused with --autoguidance, sampled plainly without.
    with tracking.stage_run(project, "p", "p", "train_cond", params, params) as run:
        run.log_model("cond", models / "cond.pt", params, {})
    with pytest.raises(SystemExit) as exit_info:
        generate(*args, "--autoguidance", "2", "--model", "models:/ddpm-mnist-cond/latest")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if not line.startswith("Downloading artifacts")] == [  # MLflow's progress bars
        "error: --autoguidance 2: models:/ddpm-mnist-cond/latest has no autoguidance guide "
        "(logged before guides were); leave out --autoguidance"
    ]
    generate(*args, "--model", "models:/ddpm-mnist-cond/2", "--out", "plain_registered.png")
    generate(*args, "--autoguidance", "1", "--out", "plain_local.png")
    assert (project / "plain_registered.png").read_bytes() == (project / "plain_local.png").read_bytes()


@pytest.mark.slow
def test_run_id_loads_the_logged_checkpoint_and_plot_made_the_gif(tiny_pipeline_copy, tmp_path):
    """Through MLflow: the parent run and its train_cond run give the image of models/cond.pt."""
    from mlflow.tracking import MlflowClient

    project = tiny_pipeline_copy
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("ddpm-mnist").experiment_id])
    parent = next(r.info.run_id for r in runs if r.data.tags.get("ddpm.role") == "pipeline")
    train_cond = next(r.info.run_id for r in runs if r.data.tags.get("ddpm.stage") == "train_cond")
    # The registry: each training registered a version; by version, alias and logged-model id.
    version = client.get_model_version("ddpm-mnist-cond", "1")
    client.set_registered_model_alias("ddpm-mnist-cond", "champion", "1")
    model_id = version.source.removeprefix("models:/")
    sources = {
        "local": [], "parent": ["--run-id", parent], "child": ["--run-id", train_cond],
        "version": ["--model", "models:/ddpm-mnist-cond/1"], "alias": ["--model", "models:/ddpm-mnist-cond@champion"],
        "logged": ["--model", f"models:/{model_id}"],
    }  # fmt: skip
    procs = run_clis(
        project,
        [
            ["--prompt", "0 1 2", "--n", "4", "--out", str(tmp_path / f"{name}.png"), *extra]
            for name, extra in sources.items()
        ],
    )
    outputs = {}
    for (name, extra), proc in zip(sources.items(), procs, strict=True):
        assert proc.returncode == 0, proc.stderr
        if extra[:1] == ["--model"]:
            assert f"; {extra[1]})" in proc.stdout
        outputs[name] = (tmp_path / f"{name}.png").read_bytes()
    assert (
        outputs["local"]
        == outputs["parent"]
        == outputs["child"]
        == outputs["version"]
        == outputs["alias"]
        == outputs["logged"]
    )
    errors = {
        "error: models:/ddpm-mnist-cond@nope: not found in": [
            "--prompt",
            "4",
            "--model",
            "models:/ddpm-mnist-cond@nope",
        ],
        "error: models:/ddpm-mnist-cond/1: is the conditional model; drop --unconditional": [
            "--unconditional",
            "--model",
            "models:/ddpm-mnist-cond/1",
        ],
        "error: --run-id and --model both name the weights; give one": [
            "--prompt",
            "4",
            "--model",
            "models:/ddpm-mnist-cond/1",
            "--run-id",
            parent,
        ],
        f"error: MLflow run {'0' * 32}: not found in sqlite:///{project}/mlflow.db": [
            "--prompt",
            "4",
            "--run-id",
            "0" * 32,
        ],
    }
    for (message, args), proc in zip(errors.items(), run_clis(project, list(errors.values())), strict=True):
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(message), proc.stderr
        assert proc.returncode == (1 if "--run-id" in args and "--model" not in args else 2), proc.stderr

    with Image.open(project / "reports" / "figures" / "denoising.gif") as gif:
        assert gif.n_frames == STEPS + 1
        assert gif.size == gif_size((grid_size(10, 4)[1], grid_size(10, 4)[0]))
    assert "figures/denoising.gif" in {a.path for a in client.list_artifacts(parent, "figures")}


def test_fallback_sample_params_match_params_yaml():
    """Outside a project folder `ddpm generate` uses its own copy of the `sample` defaults."""
    # The committed params.yaml: `dvc exp run` and `dvc exp apply` change the working copy.
    committed = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=Path(__file__).parents[1], capture_output=True, text=True, check=True
    )
    defaults = yaml.safe_load(committed.stdout)["sample"]
    assert {key: defaults[key] for key in FALLBACK_SAMPLE} == FALLBACK_SAMPLE


def test_weights_logged_before_patch_size_existed_load_as_28_pixel_networks():
    from ddpm_core.errors import TrackingError
    from ddpm_core.generation import params_from_logged

    flat = {"model.channels": "[16, 32]", "model.blocks_per_level": "1", "model.attention_heads": "2",
            "model.dropout": "0.0", "diffusion.timesteps": "50", "diffusion.schedule": "linear"}  # fmt: skip
    model, diffusion, dataset = params_from_logged(flat, "run abc")
    assert (model.patch_size, diffusion.prediction, diffusion.offset_noise, dataset) == (1, "eps", 0.0, "mnist")
    assert params_from_logged({**flat, "model.patch_size": "2"}, "run abc")[0].patch_size == 2
    with pytest.raises(TrackingError, match="run abc: its logged model/diffusion params are unusable"):
        params_from_logged({**flat, "model.patch_size": "3"}, "run abc")
