import hashlib
import io

import numpy as np
import pytest
import torch

from conftest import tiny_raw
from ddpm_core.config import parse_params
from ddpm_core.data import load_images
from ddpm_core.train import train_diffusion, warmup_cosine


class Recorder:
    """Collects what a training run logs; optionally fails at a given epoch."""

    def __init__(self, fail_at_epoch=None):
        self.metrics, self.images = [], []
        self.fail_at_epoch = fail_at_epoch

    def log_metrics(self, metrics, step):
        if step == self.fail_at_epoch:
            raise KeyboardInterrupt
        self.metrics.append((step, metrics))

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
def test_training_logs_one_loss_and_one_grid_per_epoch(mnist_root, two_epochs, tmp_path, conditional):
    data = load_images(mnist_root, "mnist", subset=two_epochs.data.train_subset)
    tracker = Recorder()
    result = train_diffusion(data, two_epochs, conditional, tmp_path / "resume.pt", tracker, device=torch.device("cpu"))
    assert [step for step, _ in tracker.metrics] == [1, 2]
    assert [m["loss"] for _, m in tracker.metrics] == result.losses
    assert all(np.isfinite(result.losses)) and result.losses[-1] < 1.0
    assert [(key, step) for key, step, _ in tracker.images] == [("samples", 1), ("samples", 2)]
    grid = tracker.images[0][2]
    assert grid.dtype == np.uint8 and grid.ndim == 2
    # Conditional grid: one row per class (10 rows of 28 px + padding); unconditional: 8 × 8.
    rows = 10 if conditional else 8
    assert grid.shape[0] == rows * 30 + 2
    assert (tmp_path / "resume.pt").exists()


def test_same_seed_same_bytes_other_seed_other_bytes(mnist_root, two_epochs, tmp_path):
    data = load_images(mnist_root, "mnist", subset=two_epochs.data.train_subset)
    runs = [train_diffusion(data, two_epochs, True, tmp_path / f"r{i}.pt", Recorder(), device=torch.device("cpu")) for i in range(2)]
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
    assert [step for step, _ in tracker.metrics] == [2]
    assert resumed.losses == straight.losses
    assert digest(resumed.ema_state_dict) == digest(straight.ema_state_dict)


def test_checkpoint_of_other_params_is_not_resumed(mnist_root, two_epochs, tmp_path):
    data = load_images(mnist_root, "mnist", subset=two_epochs.data.train_subset)
    resume = tmp_path / "resume.pt"
    train_diffusion(data, two_epochs, False, resume, Recorder(), device=torch.device("cpu"))
    other = parse_params(tiny_raw(seed=5, epochs=2, data={"train_subset": 128}))
    tracker = Recorder()
    train_diffusion(data, other, False, resume, tracker, device=torch.device("cpu"))
    assert [step for step, _ in tracker.metrics] == [1, 2]
