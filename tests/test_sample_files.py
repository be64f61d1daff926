"""The sample stage's file formats, as a user loads them with numpy."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from ddpm_core.generation import balanced_labels, generate, load_unet
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
    for script in ("fetch_data", "train", "train_evaluator", "sample", "evaluate", "plot"):
        out = subprocess.run([sys.executable, ROOT / "stages" / f"{script}.py", "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "Stage" in out.stdout, script
