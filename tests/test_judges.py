"""Controls for the two FID feature spaces: trained judges, real MNIST, known answers.

Each judge is trained here as the train_evaluator stage trains it (on fewer images, to
keep the suite fast), then FID is checked where its answer is known: real images land at
the floor, another writer population scores worse, damaged digits score far worse.
"""

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from ddpm_core.data import load_images
from ddpm_core.evaluation import FeatureFID, accuracy, predict, train_classifier

JUDGES = ("vgg", "residual")


@pytest.fixture(scope="module")
def mnist(mnist_root):
    return load_images(mnist_root, "mnist", train=True), load_images(mnist_root, "mnist", train=False)


@pytest.fixture(scope="module")
def judges(mnist):
    train, _ = mnist
    subset = type(train)(train.images[:12_000], train.labels[:12_000])
    return {
        arch: train_classifier(subset, 1, 128, 3e-3, seed, torch.device("cpu"), arch)
        for seed, arch in enumerate(JUDGES)
    }


@pytest.mark.parametrize("arch", JUDGES)
def test_each_judge_classifies_real_digits(judges, mnist, arch):
    _, test = mnist
    acc, _ = accuracy(predict(judges[arch], test.images), test.labels)
    assert acc > 0.97


@pytest.mark.parametrize("arch", JUDGES)
def test_real_images_land_at_the_floor(judges, mnist, arch):
    train, test = mnist
    fid = FeatureFID(judges[arch], test.images)
    floor = fid.score(train.images[:1000])
    held_out = fid.score(train.images[30_000:31_000])  # never seen by the judge either
    assert 0.6 < held_out / floor < 1.6


@pytest.mark.parametrize("arch", JUDGES)
def test_another_writer_population_scores_worse(judges, mnist, arch):
    # MNIST's test set: the first 5,000 digits come from NIST's SD-3 (Census Bureau staff),
    # the last 5,000 from SD-1 (high-school students). Against SD-3, SD-3 digits are closer.
    _, test = mnist
    fid = FeatureFID(judges[arch], test.images[:4000])
    same = fid.score(test.images[4000:5000])
    other = fid.score(test.images[5000:6000])
    assert other > 1.3 * same


@pytest.mark.parametrize("arch", JUDGES)
def test_noised_and_blurred_digits_score_clearly_worse(judges, mnist, arch):
    train, test = mnist
    fid = FeatureFID(judges[arch], test.images)
    clean = train.images[:1000]
    floor = fid.score(clean)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    noised = (clean.float() + 0.2 * 255 * noise).clamp(0, 255).to(torch.uint8)
    blurred = gaussian_blur(clean.float(), kernel_size=5, sigma=1.5).round().to(torch.uint8)
    assert fid.score(noised) > 3 * floor
    assert fid.score(blurred) > 3 * floor


@pytest.mark.parametrize("arch", JUDGES)
def test_broken_shapes_score_far_above_the_floor(judges, mnist, arch):
    """Digits with broken strokes, as half of an undertrained model's samples look: the top
    half of one digit on the bottom half of a digit of another class, and a 10×10 patch
    erased from the middle of the digit. Pixel statistics stay MNIST's; the shapes do not."""
    train, test = mnist
    fid = FeatureFID(judges[arch], test.images)
    clean, labels = train.images[:1000], train.labels[:1000]
    floor = fid.score(clean)
    g = torch.Generator().manual_seed(0)
    donors = train.images[1000:3000]
    donor_labels = train.labels[1000:3000]
    # for each digit, the first donor of another class after a random start
    other = torch.empty(len(clean), dtype=torch.long)
    for i, start in enumerate(torch.randint(0, len(donors), (len(clean),), generator=g).tolist()):
        order = (torch.arange(len(donors)) + start) % len(donors)
        other[i] = order[donor_labels[order] != labels[i]][0]
    spliced = clean.clone()
    spliced[:, :, 14:] = donors[other][:, :, 14:]
    erased = clean.clone()
    corners = torch.randint(6, 13, (len(clean), 2), generator=g)  # the patch covers the middle
    for image, (row, col) in zip(erased, corners.tolist(), strict=True):
        image[:, row : row + 10, col : col + 10] = 0
    # The calibration by the full judges: 31× and 64× (judge 1), 21× and 42× (judge 2);
    # these judges see 12,000 digits once (the residual one scored splices at 6.5× on a Zen 4).
    assert fid.score(spliced) > 5 * floor
    assert fid.score(erased) > 5 * floor


def test_kid_precision_recall_and_memorization_controls(judges, mnist):
    """The issue's controls, in both judges' spaces: real digits score like real digits,
    copies of training images are flagged, noise has no precision, three digits of ten
    keep precision and lose recall."""
    from ddpm_core.evaluation import FidelityJudge, fidelity_metrics, memorization

    train, test = mnist
    n = 400
    three = test.images[2000:][test.labels[2000:] < 3][:n]
    noise = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    samples = {
        "real": (test.images[1000 : 1000 + n], test.labels[1000 : 1000 + n]),  # held out of the P/R real set
        "copies": (train.images[:n], None),
        "noise": (noise, None),
        "three": (three, None),
    }
    fidelity_judges = {
        "": FidelityJudge(judges["vgg"], test.images),
        "alt": FidelityJudge(judges["residual"], test.images),
    }
    m = fidelity_metrics(fidelity_judges, train.images[30_000 : 30_000 + n], samples)
    copied, closest = memorization(test.images, train.images, {k: v[0] for k, v in samples.items()}, n)
    m.update(copied)
    for s in ("", "_alt"):
        # real digits: KID ≈ 0 (far below three digits of ten), precision and recall like the floor's
        assert abs(m[f"kid{s}_real"]) < 0.1 * m[f"kid{s}_three"]
        assert abs(m[f"kid{s}_floor"]) < 0.1 * m[f"kid{s}_three"]
        assert abs(m[f"precision{s}_real"] - m[f"precision{s}_floor"]) < 0.08
        assert abs(m[f"recall{s}_real"] - m[f"recall{s}_floor"]) < 0.08
        assert m[f"precision{s}_noise"] < 0.05
        assert m[f"recall{s}_three"] < 0.6 * m[f"recall{s}_real"]
        assert abs(m[f"precision{s}_three"] - m[f"precision{s}_real"]) < 0.1
        for name in ("kid", "precision", "recall", "fid"):
            low, high = m[f"{name}{s}_real_ci95"]["low"], m[f"{name}{s}_real_ci95"]["high"]
            if name != "fid":  # the FID point estimate is FeatureFID's, not in this dict
                assert low <= m[f"{name}{s}_real"] <= high
    assert m["memorized_copies"] == 1.0
    assert m["memorized_real"] < 0.05 and m["memorized_three"] < 0.05 and m["memorized_noise"] == 0.0
    # the ten samples nearest a training image are copies, each beside its own source
    assert len(closest) == 10 and all(row["model"] == "copies" and row["copy"] for row in closest)
    for row in closest:  # (MNIST may hold a digit twice: compare pixels, not indices)
        assert row["distance"] == 0 and torch.equal(train.images[row["train_index"]], train.images[row["sample"]])
    low, high = m["real_accuracy_ci95"]["low"], m["real_accuracy_ci95"]["high"]
    assert 0.9 < low < high <= 1.0


def test_classification_accuracy_score_controls(mnist):
    """CAS against known answers: real digits given as the samples score exactly what the
    real-trained classifier scores (same recipe, seed and images); the right digits with
    every label moved to the next class train a classifier that is wrong on nearly all
    real digits."""
    from ddpm_core.data import ImageSet
    from ddpm_core.evaluation import classification_accuracy_score

    train, test = mnist
    n = 300
    real = ImageSet(train.images[:n], train.labels[:n])
    held_out_test = ImageSet(test.images[:2000], test.labels[:2000])
    recipe = dict(epochs=5, batch_size=64, lr=3e-3, seed=0, device=torch.device("cpu"), resamples=50)
    same = classification_accuracy_score(real, real, held_out_test, **recipe)
    assert same["cas_samples"] == n
    assert same["cas_accuracy"] == same["cas_accuracy_real"] > 0.7
    low, high = same["cas_accuracy_ci95"]["low"], same["cas_accuracy_ci95"]["high"]
    assert low <= same["cas_accuracy"] <= high and high - low < 0.06
    shifted = ImageSet(train.images[n : 2 * n], (train.labels[n : 2 * n] + 1) % 10)
    wrong = classification_accuracy_score(shifted, real, held_out_test, **recipe)
    assert wrong["cas_accuracy"] < 0.1 < 0.7 < wrong["cas_accuracy_real"]
