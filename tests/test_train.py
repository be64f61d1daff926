import hashlib
import io

import numpy as np
import pytest
import torch

from conftest import tiny_raw
from ddpm_core.config import parse_params
from ddpm_core.data import load_images
from ddpm_core.diffusion import LossTerms
from ddpm_core.train import CurveMeter, StepStats, TrainingPlan, model_epochs, train_diffusion, warmup_cosine


class Recorder:
    """Collects what a training run logs; optionally fails when an epoch's mean is logged."""

    def __init__(self, fail_at_epoch=None):
        self.metrics, self.images = [], []
        self.fail_at_epoch = fail_at_epoch

    def log_metrics(self, metrics, step):
        if "epoch_loss" in metrics and step == self.fail_at_epoch:
            raise KeyboardInterrupt
        self.metrics.append((step, metrics))

    def epochs(self):
        return [(step, m) for step, m in self.metrics if "epoch_loss" in m]

    def points(self):
        return [(step, m) for step, m in self.metrics if "epoch_loss" not in m]

    def log_image(self, image, key, step):
        self.images.append((key, step, image))


def digest(state_dict) -> str:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


@pytest.fixture
def two_epochs():
    return parse_params(tiny_raw(epochs=2, data={"train_subset": 128}))


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)
    assert warmup_cosine(0, 0, 10) == 1.0


@pytest.mark.parametrize("conditional", [False, True])
def test_training_logs_a_curve_per_log_point_grids_per_preview_and_epoch_means(
    mnist_root, two_epochs, tmp_path, conditional
):
    # 128 images at batch 64: 2 steps per epoch, 4 in all; log_every 2, preview_every 3 (conftest).
    data = load_images(mnist_root, "mnist", subset=two_epochs.data.train_subset)
    tracker = Recorder()
    result = train_diffusion(data, two_epochs, conditional, tmp_path / "resume.pt", tracker, device=torch.device("cpu"))
    assert [step for step, _ in tracker.epochs()] == [1, 2]
    assert [m["epoch_loss"] for _, m in tracker.epochs()] == result.losses
    assert all(np.isfinite(result.losses)) and result.losses[-1] < 1.0

    points = tracker.points()
    assert [step for step, _ in points] == [2, 4]
    buckets = [f"eps_loss/t{lo:03d}-{lo + 199:03d}" for lo in range(0, 1000, 200)]
    for (step, logged), row, epoch_loss in zip(points, result.curve, result.losses, strict=False):
        assert (
            {"loss", "lr", "grad_norm", "images_per_s"}
            <= logged.keys()
            <= {"loss", "lr", "grad_norm", "images_per_s", *buckets}
        )
        assert row == {"step": step, "epoch": step // 2, **logged}
        # Here one log interval is one epoch: the curve's point is that epoch's mean.
        assert logged["loss"] == pytest.approx(epoch_loss, rel=1e-5)
        assert logged["grad_norm"] > 0 and logged["images_per_s"] > 0
    assert points[0][1]["lr"] > points[1][1]["lr"] == 0.0  # cosine decay ends at 0

    assert [(key, step) for key, step, _ in tracker.images] == [("samples", 3), ("samples", 4)]
    grid = tracker.images[0][2]
    assert grid.dtype == np.uint8 and grid.ndim == 2
    # Conditional grid: one row per class (10 rows of 28 px + padding); unconditional: 8 × 8.
    rows = 10 if conditional else 8
    assert grid.shape[0] == rows * 30 + 2
    assert (tmp_path / "resume.pt").exists()


def test_a_log_interval_longer_than_an_epoch_still_gives_a_point_per_epoch(mnist_root, tmp_path):
    params = parse_params(
        tiny_raw(epochs=2, data={"train_subset": 128}, train={"log_every": 1000, "preview_every": 1000})
    )
    tracker = Recorder()
    result = train_diffusion(
        load_images(mnist_root, "mnist", subset=128),
        params,
        False,
        tmp_path / "r.pt",
        tracker,
        device=torch.device("cpu"),
    )
    assert [step for step, _ in tracker.points()] == [2, 4] and [row["epoch"] for row in result.curve] == [1, 2]
    assert [step for _, step, _ in tracker.images] == [4]  # the last step always gets a grid


def test_curve_meter_means_and_noise_level_buckets():
    meter = CurveMeter(1000, torch.device("cpu"))
    assert meter.names == [
        "eps_loss/t000-199",
        "eps_loss/t200-399",
        "eps_loss/t400-599",
        "eps_loss/t600-799",
        "eps_loss/t800-999",
    ]
    meter.add(
        StepStats(
            LossTerms(torch.tensor(2.0), torch.tensor([0, 199, 999]), torch.tensor([1.0, 3.0, 5.0])), torch.tensor(4.0)
        )
    )
    meter.add(StepStats(LossTerms(torch.tensor(4.0), torch.tensor([200]), torch.tensor([7.0])), torch.tensor(2.0)))
    assert meter.take() == pytest.approx(
        {
            "loss": (2.0 * 3 + 4.0) / 4,
            "grad_norm": 3.0,
            "eps_loss/t000-199": 2.0,
            "eps_loss/t200-399": 7.0,
            "eps_loss/t800-999": 5.0,
        }
    )
    assert meter.images.item() == 0  # taken: the next interval starts empty
    assert CurveMeter(10, torch.device("cpu")).names == [
        "eps_loss/t0-1",
        "eps_loss/t2-3",
        "eps_loss/t4-5",
        "eps_loss/t6-7",
        "eps_loss/t8-9",
    ]


def test_same_seed_same_bytes_other_seed_other_bytes(mnist_root, two_epochs, tmp_path):
    data = load_images(mnist_root, "mnist", subset=two_epochs.data.train_subset)
    runs = [
        train_diffusion(data, two_epochs, True, tmp_path / f"r{i}.pt", Recorder(), device=torch.device("cpu"))
        for i in range(2)
    ]
    assert runs[0].losses == runs[1].losses
    assert digest(runs[0].ema_state_dict) == digest(runs[1].ema_state_dict)
    other = parse_params(tiny_raw(seed=1, epochs=2, data={"train_subset": 128}))
    run_other = train_diffusion(data, other, True, tmp_path / "other.pt", Recorder(), device=torch.device("cpu"))
    assert run_other.losses != runs[0].losses


def test_interrupted_run_resumes_to_the_same_bytes(mnist_root, two_epochs, tmp_path):
    data = load_images(mnist_root, "mnist", subset=two_epochs.data.train_subset)
    straight = train_diffusion(data, two_epochs, True, tmp_path / "straight.pt", Recorder(), device=torch.device("cpu"))

    resume = tmp_path / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        train_diffusion(data, two_epochs, True, resume, Recorder(fail_at_epoch=2), device=torch.device("cpu"))
    assert torch.load(resume, weights_only=True)["epoch"] == 1
    tracker = Recorder()
    resumed = train_diffusion(data, two_epochs, True, resume, tracker, device=torch.device("cpu"))
    # The saved curve and epoch 1's mean are logged again, so the new run has all of it.
    assert [step for step, _ in tracker.epochs()] == [1, 2] and [step for step, _ in tracker.points()] == [2, 4]
    assert resumed.losses == straight.losses
    timeless = lambda curve: [{k: v for k, v in row.items() if k != "images_per_s"} for row in curve]  # noqa: E731
    assert timeless(resumed.curve) == timeless(straight.curve)
    assert digest(resumed.ema_state_dict) == digest(straight.ema_state_dict)


def test_checkpoint_of_other_params_is_not_resumed(mnist_root, two_epochs, tmp_path):
    data = load_images(mnist_root, "mnist", subset=two_epochs.data.train_subset)
    resume = tmp_path / "resume.pt"
    train_diffusion(data, two_epochs, False, resume, Recorder(), device=torch.device("cpu"))
    other = parse_params(tiny_raw(seed=5, epochs=2, data={"train_subset": 128}))
    tracker = Recorder()
    train_diffusion(data, other, False, resume, tracker, device=torch.device("cpu"))
    assert [step for step, _ in tracker.epochs()] == [1, 2]


def test_guide_snapshot_is_the_ema_at_its_step_and_survives_a_resume(mnist_root, two_epochs, tmp_path):
    # 128 images at batch 64: 2 steps per epoch. A snapshot at step 2 (the end of epoch 1)
    # must equal the EMA weights the epoch-1 checkpoint holds; one at step 3 must come out of
    # a run resumed after epoch 1 with the same bytes as out of an uninterrupted run.
    data = load_images(mnist_root, "mnist", subset=two_epochs.data.train_subset)
    cpu = torch.device("cpu")
    straight = train_diffusion(data, two_epochs, True, tmp_path / "s.pt", Recorder(), device=cpu, snapshot_steps=(2, 3))
    assert sorted(straight.snapshots) == [2, 3]

    resume = tmp_path / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        train_diffusion(data, two_epochs, True, resume, Recorder(fail_at_epoch=2), device=cpu, snapshot_steps=(2, 3))
    saved = torch.load(resume, weights_only=True)
    ema_after_epoch_1 = {k.removeprefix("module."): v for k, v in saved["optimization"]["ema"].items()}
    ema_after_epoch_1.pop("n_averaged")
    assert digest(straight.snapshots[2]) == digest(ema_after_epoch_1)
    assert digest(saved["snapshots"][2]) == digest(straight.snapshots[2])

    resumed = train_diffusion(data, two_epochs, True, resume, Recorder(), device=cpu, snapshot_steps=(2, 3))
    assert digest(resumed.snapshots) == digest(straight.snapshots)
    assert digest(resumed.snapshots[3]) != digest(straight.snapshots[2]) != digest(straight.ema_state_dict)


def test_default_snapshot_is_the_guide_step_of_the_plan(mnist_root, tmp_path):
    params = parse_params(tiny_raw(epochs=2, data={"train_subset": 128}, train={"guide_at": 0.5}))
    data = load_images(mnist_root, "mnist", subset=128)
    result = train_diffusion(data, params, False, tmp_path / "r.pt", device=torch.device("cpu"))
    assert TrainingPlan.of(128, params, False).guide_step == 2 and list(result.snapshots) == [2]


def test_training_plan_splits_the_passes_between_the_models():
    # 60,000 images at batch 32: 1,875 steps per pass; 2 × 3 passes split 3:1.
    params = parse_params(
        tiny_raw(epochs=3, data={"train_subset": None}, train={"batch_size": 32, "cond_share": 0.25, "guide_at": 0.125})
    )
    uncond, cond = TrainingPlan.of(60_000, params, False), TrainingPlan.of(60_000, params, True)
    assert model_epochs(params, False) == 4.5 and model_epochs(params, True) == 1.5
    assert (uncond.total_steps, uncond.epochs, uncond.steps_in(5)) == (8438, 5, 938)
    assert (cond.total_steps, cond.epochs, cond.steps_in(1), cond.steps_in(2)) == (2812, 2, 1875, 937)
    assert cond.guide_step == round(0.125 * 2812) == 352
    even = parse_params(tiny_raw(epochs=3, data={"train_subset": None}, train={"batch_size": 32}))
    assert (
        TrainingPlan.of(60_000, even, True).total_steps == TrainingPlan.of(60_000, even, False).total_steps == 3 * 1875
    )


def test_a_partial_last_pass_trains_its_steps_and_means_its_own_images(mnist_root, tmp_path):
    # 128 images at batch 64, 1 epoch split 3:1 → uncond 1.5 passes = 3 steps, cond 0.5 = 1 step
    params = parse_params(tiny_raw(epochs=1, data={"train_subset": 128}, train={"cond_share": 0.25, "log_every": 1}))
    data = load_images(mnist_root, "mnist", subset=128)
    tracker = Recorder()
    uncond = train_diffusion(data, params, False, tmp_path / "u.pt", tracker, device=torch.device("cpu"))
    assert [step for step, _ in tracker.points()] == [1, 2, 3] and [s for s, _ in tracker.epochs()] == [1, 2]
    # the second pass is one step of 64 images: its mean loss is that step's loss
    assert uncond.losses[1] == pytest.approx(tracker.points()[-1][1]["loss"], rel=1e-5)
    cond = train_diffusion(data, params, True, tmp_path / "c.pt", Recorder(), device=torch.device("cpu"))
    assert [row["step"] for row in cond.curve] == [1] and len(cond.losses) == 1
