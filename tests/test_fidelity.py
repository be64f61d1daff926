"""KID, precision/recall, memorization and bootstrap intervals against known answers, on
synthetic features where the truth is known (the image-level controls with the trained
judges are in test_judges.py)."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from ddpm_core.fidelity import (
    FrechetReference,
    bootstrap_ci,
    frechet_distance,
    kid,
    kid_resampler,
    knn_radii,
    mean_ci,
    memorization_threshold,
    nearest_neighbours,
    precision_recall,
)

DIM = 16


def clusters(n: int, centres: list[int], seed: int, spread: float = 0.3) -> torch.Tensor:
    """n points of a mixture of unit-spaced Gaussian clusters, one centre per listed index."""
    g = torch.Generator().manual_seed(seed)
    means = torch.eye(10, DIM) * 4  # ten well-separated centres
    which = torch.tensor(centres)[torch.randint(0, len(centres), (n,), generator=g)]
    return means[which] + spread * torch.randn(n, DIM, generator=g)


ALL = list(range(10))


class Identity(nn.Module):
    """A `feature=` module for torchmetrics that passes features through."""

    def __init__(self):
        super().__init__()
        self.num_features = DIM

    def forward(self, x):
        return x


def test_frechet_distance_is_the_closed_form():
    real, fake = clusters(500, ALL, 0), clusters(400, [0, 1, 2], 1) * 1.5
    mu_r, mu_f = real.double().mean(0).numpy(), fake.double().mean(0).numpy()
    cov_r, cov_f = np.cov(real.double().numpy().T), np.cov(fake.double().numpy().T)
    expected = ((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2 * scipy.linalg.sqrtm(cov_r @ cov_f).real)
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-8)
    assert abs(frechet_distance(real, real)) < 1e-6


def test_frechet_distance_matches_torchmetrics_fid():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = clusters(600, ALL, 2), clusters(500, [3, 4, 5, 6], 3)
    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = metric.compute().item()
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-4)
    assert FrechetReference(real).distance(fake) == pytest.approx(expected, rel=1e-4)


def test_kid_matches_torchmetrics_and_is_unbiased():
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(0)
    real, fake = clusters(300, ALL, 4), clusters(300, [0, 1, 2], 5)
    # With one subset of all points both are the same number, whatever the permutations.
    metric = KernelInceptionDistance(feature=Identity(), subsets=1, subset_size=300)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert kid(real, fake, g, subsets=1, subset_size=300) == pytest.approx(metric.compute()[0].item(), rel=1e-5)
    # Unbiased: two draws of one distribution average ≈ 0 (a biased MMD would be > 0),
    # far below two different distributions.
    same = [
        kid(clusters(300, ALL, 10 + i), clusters(300, ALL, 20 + i), g, subsets=10, subset_size=200) for i in range(5)
    ]
    different = kid(clusters(300, ALL, 30), clusters(300, [0, 1, 2], 31), g, subsets=10, subset_size=200)
    assert abs(np.mean(same)) < 0.02 * different


def test_knn_radius_of_points_on_a_line():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(points, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(points, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_precision_recall_controls():
    real = clusters(1000, ALL, 6)
    # another draw of the real distribution: both well above 0 and alike (with k = 3 in 16
    # dimensions, a ball around each point misses part of its own distribution: ~0.8)
    p, r = (x.float().mean().item() for x in precision_recall(real, clusters(1000, ALL, 7)))
    assert p > 0.7 and r > 0.7 and abs(p - r) < 0.05
    # noise far from every digit: nothing is inside the real manifold
    noise = 10 * torch.randn(1000, DIM, generator=torch.Generator().manual_seed(8))
    assert precision_recall(real, noise)[0].float().mean().item() == 0.0
    # three modes of ten: recall falls to at most 3/10 of itself, precision stays
    p3, r3 = (x.float().mean().item() for x in precision_recall(real, clusters(1000, [0, 1, 2], 9)))
    assert abs(p3 - p) < 0.05
    assert 0.1 < r3 < 0.3 * r


def test_memorization_controls():
    train = clusters(2000, ALL, 11)
    held_out = clusters(500, ALL, 12)
    threshold = memorization_threshold(nearest_neighbours(held_out, train)[0], quantile=0.01)
    assert threshold > 0
    picked = torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:300]
    distances, indices = nearest_neighbours(train[picked], train, batch=128)  # several batches
    assert (distances < threshold).float().mean().item() == 1.0
    assert torch.equal(indices, picked)  # each copy's nearest training point is its source
    new = clusters(500, ALL, 13)
    assert (nearest_neighbours(new, train)[0] < threshold).float().mean().item() < 0.05


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_n():
    widths = []
    for n in (100, 1600):
        values = (torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3).double()
        low, high = mean_ci(values, torch.Generator().manual_seed(0))
        assert low <= values.mean().item() <= high
        widths.append(high - low)
    # the width of a mean's interval falls as 1/√n: 16× the points, about a quarter
    assert widths[1] == pytest.approx(widths[0] / 4, rel=0.35)
    # a Bernoulli(0.3) mean of 1,600 points: ±1.96·√(0.21/1600) = ±0.0225
    assert widths[1] == pytest.approx(2 * 1.96 * (0.21 / 1600) ** 0.5, rel=0.15)


def test_bootstrap_is_seeded():
    values = torch.arange(50, dtype=torch.float64)
    stat = lambda idx: values[idx].median().item()  # noqa: E731
    first = bootstrap_ci(stat, 50, torch.Generator().manual_seed(3), resamples=100)
    assert first == bootstrap_ci(stat, 50, torch.Generator().manual_seed(3), resamples=100)


def test_frechet_reference_is_the_same_distance():
    real, fake = clusters(800, ALL, 40), clusters(300, [1, 2, 3], 41) * 1.2
    assert FrechetReference(real).distance(fake) == pytest.approx(frechet_distance(real, fake), rel=1e-7)


def test_kid_resampler_without_repeats_is_the_unbiased_mmd():
    from torchmetrics.image.kid import poly_mmd

    real, fake = clusters(400, ALL, 42), clusters(200, [4, 5], 43)
    g = torch.Generator().manual_seed(5)
    resampler = kid_resampler(real, fake, g)
    subset = real[torch.randperm(400, generator=torch.Generator().manual_seed(5))[:200]]
    assert resampler(torch.arange(200)) == pytest.approx(poly_mmd(subset.double(), fake.double()).item(), rel=1e-9)
    # a permutation of the points is the same set
    assert resampler(torch.randperm(200)) == pytest.approx(resampler(torch.arange(200)), rel=1e-9)
