"""benchmarks/score.py and SampleScorer: saved samples score what the evaluate stage says."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from ddpm_core.data import load_images
from ddpm_core.errors import DataError
from ddpm_core.evaluation import ARCHITECTURES, JUDGES, SampleScorer, evaluate_samples, load_judges
from ddpm_core.generation import save_samples
from ddpm_core.pixels import pixel_metrics

N = 200


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Both judges, untrained (weights from fixed seeds): the numbers are checked for
    agreement between the two code paths, not for meaning (tests/test_judges.py does that)."""
    folder = tmp_path_factory.mktemp("models")
    for seed, (file, arch) in enumerate(JUDGES.values()):
        torch.manual_seed(seed)
        torch.save(ARCHITECTURES[arch]().state_dict(), folder / file)
    return folder


@pytest.fixture(scope="module")
def data(mnist_root):
    return load_images(mnist_root, "mnist", train=False), load_images(mnist_root, "mnist", train=True, subset=N)


@pytest.fixture(scope="module")
def scorer(models_dir, data):
    test, train = data
    return SampleScorer(load_judges(models_dir), test.images, train.images)


def sets(test):
    """A labelled set (real digits, their labels) and an unlabelled one (noised digits)."""
    cond, labels = test.images[5000 : 5000 + N], test.labels[5000 : 5000 + N]
    noise = torch.randn(N, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    uncond = (test.images[7000 : 7000 + N].float() + 40 * noise).clamp(0, 255).to(torch.uint8)
    return uncond, cond, labels


def test_scorer_gives_the_evaluate_stages_numbers(scorer, data):
    test, train = data
    uncond, cond, labels = sets(test)
    s_cond, s_uncond = scorer.score(cond, labels), scorer.score(uncond)
    pixels = pixel_metrics(uncond, cond, test.images[:N])  # as the stage calls it, num_samples = N
    for name, classifier in scorer.judges.items():
        x = f"_{name}" if name else ""
        stage = evaluate_samples(classifier, scorer.fids[name], train.images, uncond, cond, labels, judge=name)
        assert s_cond[f"fid{x}_floor"] == s_uncond[f"fid{x}_floor"] == stage[f"fid{x}_floor"]
        assert s_cond[f"fid{x}"] == stage[f"fid{x}_cond"] and s_uncond[f"fid{x}"] == stage[f"fid{x}_uncond"]
        assert s_cond[f"fid{x}_over_floor"] == stage[f"fid{x}_cond_over_floor"]
        assert s_cond[f"accuracy{x}"] == stage[f"cond_accuracy{x}"]
        assert s_uncond[f"max_class_deviation{x}"] == stage[f"uncond_max_class_deviation{x}"]
    assert "accuracy" not in s_uncond and "accuracy_alt" not in s_uncond
    assert (
        s_cond["zero_pixels"] == pixels["zero_pixels_cond"] and s_uncond["zero_pixels"] == pixels["zero_pixels_uncond"]
    )
    assert s_cond["zero_pixels_real"] == pixels["zero_pixels_real"]
    assert (
        s_cond["pixel_hist_tv"] == pixels["pixel_hist_tv_cond"]
        and s_uncond["pixel_hist_tv"] == pixels["pixel_hist_tv_uncond"]
    )
    assert 0 < s_cond["pixel_hist_tv_floor"] < s_uncond["pixel_hist_tv"]  # real digits are closer than noised ones


def score_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "score.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def test_cli_scores_npz_files_as_the_library_does(scorer, models_dir, data, mnist_root, tmp_path):
    test, _ = data
    uncond, cond, labels = sets(test)
    save_samples(tmp_path / "cond.npz", cond, labels)
    save_samples(tmp_path / "uncond.npz", uncond)
    # The unlabelled file twice: as it is, then with cond's labels.
    out = score_cli(
        tmp_path / "cond.npz",
        tmp_path / "uncond.npz",
        "--json",
        "--models",
        models_dir,
        "--data",
        mnist_root,
        "--dataset",
        "mnist",
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [row.pop("file") for row in rows] == [str(tmp_path / "cond.npz"), str(tmp_path / "uncond.npz")]
    # Another process: the same code, up to float rounding (under load 1e-9 was seen to fail).
    assert rows == [pytest.approx(scorer.score(cond, labels), rel=1e-6), pytest.approx(scorer.score(uncond), rel=1e-6)]


def test_text_output_and_labels_from_another_file(scorer, data, tmp_path):
    spec = importlib.util.spec_from_file_location("score_cli", ROOT / "benchmarks" / "score.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    test, _ = data
    uncond, cond, labels = sets(test)
    save_samples(tmp_path / "cond.npz", cond, labels)
    save_samples(tmp_path / "uncond.npz", uncond)
    images, got = cli.read(tmp_path / "uncond.npz", tmp_path / "cond.npz")
    assert torch.equal(images, uncond) and torch.equal(got, labels)
    scores = scorer.score(images, got)
    text = cli.describe(tmp_path / "uncond.npz", scores, {name: file for name, (file, _) in JUDGES.items()})
    assert text.splitlines()[0] == f"{tmp_path / 'uncond.npz'}: {N} images"
    assert f"evaluator.pt      FID {scores['fid']:9.3f}   floor {scores['fid_floor']:8.3f}" in text
    assert (
        f"evaluator_alt.pt  FID {scores['fid_alt']:9.3f}" in text and f"accuracy {scores['accuracy_alt']:.2%}" in text
    )
    assert f"exact-zero pixels  {scores['zero_pixels']:.1%}" in text and "pixel-histogram TV" in text
    short = {**scores, "num_samples": N}
    del short["accuracy"], short["accuracy_alt"]
    assert "accuracy" not in cli.describe(tmp_path / "uncond.npz", short, {"": "a", "alt": "b"})
    save_samples(tmp_path / "short.npz", cond[:5], labels[:5])
    with pytest.raises(DataError, match="5 labels for 200 images"):
        cli.read(tmp_path / "uncond.npz", tmp_path / "short.npz")
    with pytest.raises(DataError, match="holds no `labels`"):
        cli.read(tmp_path / "cond.npz", tmp_path / "uncond.npz")
    with pytest.raises(DataError, match="not found"):
        cli.read(tmp_path / "missing.npz", None)


def test_cli_refuses_what_is_not_save_samples_output(models_dir, mnist_root, tmp_path):
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 28, 28), dtype=np.float32))
    out = score_cli(tmp_path / "float.npz", "--models", models_dir, "--data", mnist_root, "--dataset", "mnist")
    assert (
        out.returncode == 1
        and out.stderr.strip()
        == f"error: {tmp_path / 'float.npz'}: images are float32 4×28×28, expected uint8 N×28×28; "
        "give an .npz as ddpm_core.generation.save_samples writes it (`images` uint8 N×28×28, `labels` 0–9)"
    )
