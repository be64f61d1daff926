"""The sample stage's file formats, as a user loads them with numpy."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from ddpm_core.errors import DataError
from ddpm_core.generation import balanced_labels, generate, load_samples, load_unet, save_samples
from ddpm_core.samplers import DDIMSampler
from ddpm_core.schedule import make_schedule
from ddpm_core.unet import build_unet


def test_balanced_labels():
    assert torch.bincount(balanced_labels(1000)).tolist() == [100] * 10
    assert torch.bincount(balanced_labels(25)).tolist() == [3] * 5 + [2] * 5


def test_generate_returns_uint8_images_and_depends_only_on_seed_and_batch(tiny_params, tmp_path):
    torch.manual_seed(0)
    model = build_unet(tiny_params.model, 10).eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    model = load_unet(tmp_path / "m.pt", tiny_params.model, True, torch.device("cpu"))
    sampler = DDIMSampler(make_schedule("linear", 1000), 3)
    labels = balanced_labels(12)
    a = generate(model, sampler, 12, torch.Generator().manual_seed(1), labels, 2.0, batch_size=5)
    b = generate(model, sampler, 12, torch.Generator().manual_seed(1), labels, 2.0, batch_size=5)
    assert a.shape == (12, 1, 28, 28) and a.dtype == torch.uint8
    assert torch.equal(a, b)


def test_stage_scripts_explain_themselves():
    # Started together: each spends seconds importing torch and mlflow on one core.
    procs = {
        script: subprocess.Popen(
            [sys.executable, ROOT / "stages" / f"{script}.py", "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script in ("fetch_data", "train", "train_evaluator", "sample", "evaluate", "plot")
    }
    for script, proc in procs.items():
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "Stage" in stdout, script


def test_samples_round_trip_through_the_npz_format_users_load(tmp_path):
    images = torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8)
    labels = balanced_labels(30)
    save_samples(tmp_path / "cond.npz", images, labels)
    save_samples(tmp_path / "uncond.npz", images)
    with np.load(tmp_path / "cond.npz") as f:
        assert sorted(f.files) == ["images", "labels"]
        assert f["images"].shape == (30, 28, 28) and f["images"].dtype == np.uint8 and f["labels"].dtype == np.int64
    with np.load(tmp_path / "uncond.npz") as f:
        assert f.files == ["images"]
    back, back_labels = load_samples(tmp_path / "cond.npz")
    assert torch.equal(back, images) and torch.equal(back_labels, labels)
    assert load_samples(tmp_path / "uncond.npz")[1] is None
    with pytest.raises(DataError, match=r"missing.npz: not found; run `dvc repro -s sample`"):
        load_samples(tmp_path / "missing.npz")
