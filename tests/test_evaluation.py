import itertools

import pytest
import torch

from ddpm_core.data import ImageSet, load_images
from ddpm_core.evaluation import (
    Classifier,
    FeatureFID,
    FidelityJudge,
    accuracy,
    autoguidance_sweep_rows,
    class_histogram,
    evaluate_autoguidance_sweep,
    evaluate_guidance_sweep,
    predict,
    random_shift,
    sweep_rows,
    train_classifier,
)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return Classifier().eval()


def real_like(n, seed):
    """Blurry random blobs: a stand-in image distribution with some structure."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 7, 7, generator=g)
    return (torch.nn.functional.interpolate(low, size=28, mode="bilinear") * 255).to(torch.uint8)


def test_fid_of_a_set_against_itself_is_zero(classifier):
    images = real_like(400, 0)
    assert FeatureFID(classifier, images).score(images) == pytest.approx(0.0, abs=1e-3)


def test_fid_grows_monotonically_with_noise(classifier):
    reference = real_like(500, 0)
    fid = FeatureFID(classifier, reference)
    other = real_like(500, 1)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(other.shape, generator=g)
    scores = [
        fid.score((other.float() + sigma * noise).clamp(0, 255).to(torch.uint8)) for sigma in (0, 20, 40, 80, 160)
    ]
    assert all(a < b for a, b in itertools.pairwise(scores)), scores
    assert scores[0] < 0.2 * scores[-1]


def test_classifier_features_have_the_declared_size(classifier):
    feats = classifier.features(real_like(3, 0))
    assert feats.shape == (3, Classifier.num_features)


def test_accuracy_against_hand_made_labels():
    target = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 2, 2, 2, 2, 0])
    overall, per_class = accuracy(predicted, target)
    assert overall == pytest.approx(7 / 10)
    assert per_class == pytest.approx({0: 1 / 2, 1: 2 / 3, 2: 4 / 5})


def test_class_histogram_and_deviation():
    predicted = torch.tensor([3] * 5 + [0, 1, 2, 4, 5] + [6] * 0)
    fractions, deviation = class_histogram(predicted)
    assert fractions == pytest.approx([0.1, 0.1, 0.1, 0.5, 0.1, 0.1, 0, 0, 0, 0])
    assert deviation == pytest.approx(0.4)
    uniform, dev = class_histogram(torch.arange(100) % 10)
    assert uniform == pytest.approx([0.1] * 10) and dev == pytest.approx(0.0)


def test_predict_returns_one_label_per_image(classifier):
    labels = predict(classifier, real_like(25, 3), batch_size=10)
    assert labels.shape == (25,) and labels.dtype == torch.int64
    assert ((labels >= 0) & (labels < 10)).all()


def test_random_shift_moves_each_image_by_at_most_two_pixels():
    image = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    image[0, 0, 14, 14] = 255
    shifted = random_shift(image.repeat(200, 1, 1, 1), torch.Generator().manual_seed(0))
    positions = {tuple(torch.nonzero(s[0])[0].tolist()) for s in shifted}
    assert positions <= {(14 + dy, 14 + dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert len(positions) > 15


def test_guidance_sweep_scores_each_weight_beside_the_floor_for_its_size(classifier):
    reference, train = real_like(300, 0), real_like(300, 1)
    fid = FeatureFID(classifier, reference)
    images = real_like(40, 2)
    predicted = predict(classifier, images)
    noise = torch.randint(0, 256, (40, 1, 28, 28), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    # Labels the evaluator agrees with at w=0, and never at w=2.5.
    sweep = evaluate_guidance_sweep(
        classifier, fid, train, {0.0: (images, predicted), 2.5: (noise, (predict(classifier, noise) + 1) % 10)}
    )
    assert set(sweep) == {"num_samples", "fid_floor", "w0", "w2.5"}
    assert sweep["num_samples"] == 40
    assert sweep["fid_floor"] == pytest.approx(fid.score(train[:40]))
    assert sweep["w0"]["cond_accuracy"] == 1.0 and sweep["w2.5"]["cond_accuracy"] == 0.0
    assert sweep["w0"]["fid"] == pytest.approx(fid.score(images)) and sweep["w2.5"]["fid"] > sweep["w0"]["fid"]
    assert [row["guidance"] for row in sweep_rows({"guidance_sweep": sweep})] == [0.0, 2.5]
    assert sweep_rows({}) == []


@pytest.fixture(scope="module")
def mnist_judges(mnist_root):
    """Real MNIST and both judges' architectures trained on its first 6,000 digits (one
    epoch each, seconds): over 90 % test accuracy, enough to count digits by class."""
    train, test = load_images(mnist_root, "mnist", train=True), load_images(mnist_root, "mnist", train=False)
    subset = ImageSet(train.images[:6000], train.labels[:6000])
    cpu = torch.device("cpu")
    judges = {
        name: train_classifier(subset, 1, 128, 3e-3, seed, cpu, arch)
        for seed, (name, arch) in enumerate((("", "vgg"), ("alt", "residual")))
    }
    return train, test, judges


def test_autoguidance_sweep_puts_real_digits_at_the_floor_and_flags_a_single_class(mnist_judges):
    train, test, judges = mnist_judges
    fids = {name: FidelityJudge(judge, test.images[:2000], resamples=50) for name, judge in judges.items()}
    n = 200
    # Real digits no judge was trained on, n/10 of each class; and n digits all of one class.
    unseen = ImageSet(train.images[10_000:], train.labels[10_000:])
    real = torch.cat([unseen.images[unseen.labels == c][: n // 10] for c in range(10)])
    ones = test.images[test.labels == 1][:n]  # all one class
    sweep = evaluate_autoguidance_sweep(
        judges[""], fids[""], train.images, {2.0: ones, 1.0: real}, fids["alt"], intervals=(fids, 0)
    )
    assert set(sweep) == {"num_samples", "fid_floor", "fid_alt_floor", "a1", "a2"} and sweep["num_samples"] == n
    assert sweep["fid_floor"] == pytest.approx(fids[""].score(train.images[:n]))
    assert sweep["fid_alt_floor"] == pytest.approx(fids["alt"].score(train.images[:n]))
    row_keys = {
        "autoguidance",
        "fid",
        "fid_alt",
        "max_class_deviation",
        "max_class_deviation_alt",
        "fid_ci95",
        "fid_alt_ci95",
    }
    assert set(sweep["a1"]) == set(sweep["a2"]) == row_keys
    real_row, ones_row = sweep["a1"], sweep["a2"]
    # Real digits score what as many real training digits score, and the judges find them
    # balanced over the classes (up to their own errors); the single class is 0.9 off.
    for s in ("", "_alt"):
        assert 0.6 < real_row[f"fid{s}"] / sweep[f"fid{s}_floor"] < 1.6
        assert ones_row[f"fid{s}"] > 5 * sweep[f"fid{s}_floor"]
        assert real_row[f"fid{s}_ci95"]["low"] <= real_row[f"fid{s}"] <= real_row[f"fid{s}_ci95"]["high"]
        assert real_row[f"max_class_deviation{s}"] < 0.08
        # Every image a 1: a share of 1 for that class, 0.9 from the even 0.1.
        assert ones_row[f"max_class_deviation{s}"] == pytest.approx(0.9, abs=0.02)
    assert real_row["max_class_deviation"] == pytest.approx(class_histogram(predict(judges[""], real))[1])
    rows = autoguidance_sweep_rows({"autoguidance_sweep": sweep})
    assert [row["autoguidance"] for row in rows] == [1.0, 2.0]
    assert autoguidance_sweep_rows({}) == []
