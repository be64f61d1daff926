"""benchmarks/peers.py: ours against diffusers' recipe at equal minutes, end to end at a tiny budget."""

import argparse
import importlib.util
import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import ROOT
from ddpm_core.evaluation import ARCHITECTURES, JUDGES

SCRIPT = ROOT / "benchmarks" / "peers.py"
THEIRS = ("diffusers-small", "diffusers-matched")


def load_peers():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Both judges, untrained (fixed seeds): the run is checked for its shape and its
    bookkeeping, not for what the numbers say (tests/test_judges.py does that)."""
    folder = tmp_path_factory.mktemp("models")
    for seed, (file, arch) in enumerate(JUDGES.values()):
        torch.manual_seed(seed)
        torch.save(ARCHITECTURES[arch]().state_dict(), folder / file)
    return folder


def test_a_tiny_run_has_every_row_within_the_budget(models_dir, mnist_root, tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "peers" / "table.csv"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--budgets", "1,2", "--models-dir", str(models_dir),
         "--data", str(mnist_root), "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["rows"]) == len(table)

    samplers = {"ddpm_core": {"uncond": ["dpmpp2m:5 ag1.5"], "cond": ["dpmpp2m:5 cfg2 ag2"]}}
    for recipe in THEIRS:
        samplers[recipe] = {"uncond": ["ddpm:4", "ddim:3"], "cond": ["ddpm:4 cfg2", "ddim:3 cfg2"]}
    expected = {
        (recipe, kind, budget, sampler)
        for recipe, by_kind in samplers.items()
        for kind, names in by_kind.items()
        for budget in (1, 2)
        for sampler in names
    }
    assert sorted(map(tuple, table[["recipe", "model", "budget", "sampler"]].values.tolist())) == sorted(expected)

    # The budget is ours' measured training time; budget 2 is twice the epochs.
    ours = table[table.recipe == "ddpm_core"].set_index(["model", "budget"])
    for kind in ("uncond", "cond"):
        assert ours.loc[(kind, 2), "steps"] == 2 * ours.loc[(kind, 1), "steps"] == 2 * 4
        assert ours.loc[(kind, 1), "train_s"] == pytest.approx(60 * ours.loc[(kind, 1), "budget_minutes"])
    for _, row in table[table.recipe != "ddpm_core"].iterrows():
        budget_s = ours.loc[(row.model, row.budget), "train_s"]
        assert row.budget_minutes == pytest.approx(budget_s / 60)
        # On the clock: a step starts only when it should end within the budget, so every step
        # before the last ended within it (the last one's own length depends on the machine's load).
        assert 1 <= row.steps <= row.planned_steps
        assert 0 < row.last_step_s <= row.train_s
        assert row.train_s - row.last_step_s <= budget_s + 1e-9
    assert (table.samples == 20).all()

    numbers = ["minutes", "train_img_s", "sample_img_s", "fid_x_floor", "fid_alt_x_floor", "precision", "recall",
               "precision_alt", "recall_alt", "zero_pixels", "zero_pixels_real"]  # fmt: skip
    assert all(math.isfinite(v) for v in table[numbers].values.flatten())
    assert (table[numbers] >= 0).all().all() and (table.fid_x_floor > 0).all()
    assert table[["precision", "recall", "zero_pixels"]].le(1).all().all()
    cond = table.model == "cond"
    assert table[cond].accuracy.between(0, 1).all() and table[~cond].accuracy.isna().all()

    assert len(saved["ratios"]) == len(table) - 4  # every row of theirs beside ours at its model and budget
    ratio = saved["ratios"][0]
    mine = ours.loc[(ratio["model"], ratio["budget"])]
    theirs = table[(table.recipe == ratio["theirs"]) & (table.sampler == ratio["sampler"])]
    theirs = theirs[(theirs.model == ratio["model"]) & (theirs.budget == ratio["budget"])].iloc[0]
    assert ratio["fid_x_floor"] == pytest.approx(mine.fid_x_floor / theirs.fid_x_floor)
    assert saved["settings"]["theirs"]["warmup_steps"] == 500 and saved["settings"]["theirs_batch_size"] == 16
    assert "ours / theirs at equal minutes" in proc.stdout
    assert "peers [1/" in proc.stderr and "left" in proc.stderr  # the progress line with its estimate

    # A picture of every row: its first samples, 10 a row; the conditional ones a row per class.
    from PIL import Image

    grids = sorted((out.parent / "table_grids").glob("*.png"))
    assert len(grids) == len(table)
    for path in grids:
        conditional = "_cond_" in path.name
        width, height = Image.open(path).size
        assert (width, height) == ((2 + 2 * 30, 10 * 30 + 2) if conditional else (10 * 30 + 2, 2 * 30 + 2))


def test_arguments():
    peers = load_peers()
    assert peers.sampler_spec("ddpm:1000:200") == ("ddpm", 1000, 200)
    assert peers.sampler_spec("ddim:50") == ("ddim", 50, None)
    assert peers.budgets_arg("1,3") == [1, 3]
    for bad in ("euler:10", "ddim", "ddim:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            peers.sampler_spec(bad)
    for bad in ("0,1", "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            peers.budgets_arg(bad)
    text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True).stdout
    for option in ("--budgets", "--samples", "--recipes", "--theirs-samplers", "--tiny", "--max-steps", "--out"):
        assert option in text
