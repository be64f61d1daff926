"""Beyond one FID: KID, precision and recall, memorization, and bootstrap intervals.

Pure tensor functions over feature vectors (N, d) of one judge (`evaluation.judge_features`)
or over flattened pixels. The evaluate stage (through `evaluation.FeatureFID`,
`fidelity_metrics` and `memorization`) applies them to each model's samples against the
real test set.

- Fréchet distance: the FID formula on two feature sets; `FrechetReference` against a fixed
  reference, fast enough to resample. Both equal torchmetrics' `FrechetInceptionDistance`
  (tests/test_fidelity.py).
- KID (Bińkowski et al. 2018): the unbiased squared MMD with the cubic polynomial kernel,
  averaged over random subsets, computed by torchmetrics' `poly_mmd` (the kernel of its
  `KernelInceptionDistance`); unbiased at small N, so its floor for real images is ≈ 0.
- Precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
  around its points with the radius of the k-th nearest neighbour within the set; precision
  is the share of generated points inside the real manifold (fidelity), recall the share of
  real points inside the generated one (coverage).
- Memorization: a sample counts as a copy when its nearest training image is closer than
  `memorization_threshold` of what held-out real digits are to theirs.
- Intervals: percentile bootstrap over the points a number averages over.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of a feature set (N, d), in float64."""
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def frechet_from_stats(mu_r: torch.Tensor, cov_r: torch.Tensor, mu_f: torch.Tensor, cov_f: torch.Tensor) -> float:
    """‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^½).

    tr((Σ_r Σ_f)^½) is the sum of the square roots of the eigenvalues of Σ_r Σ_f (real and
    non-negative for two covariance matrices, up to rounding), as torchmetrics computes it."""
    eigenvalues = torch.linalg.eigvals(cov_r @ cov_f).real.clamp(min=0)
    return ((mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * eigenvalues.sqrt().sum()).item()


class FrechetReference:
    """The FID formula against one fixed reference set, fast enough to resample: with
    A = Σ_r^½ computed once, tr((Σ_r Σ_f)^½) = tr((A Σ_f A)^½), the square roots of the
    eigenvalues of a symmetric matrix (Σ_r Σ_f and A Σ_f A are similar)."""

    def __init__(self, reference: torch.Tensor):
        self.mu, self.cov = gaussian_stats(reference)
        values, vectors = torch.linalg.eigh(self.cov)
        self.root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T

    def distance(self, features: torch.Tensor) -> float:
        mu_f, cov_f = gaussian_stats(features)
        eigenvalues = torch.linalg.eigvalsh(self.root @ cov_f @ self.root).clamp(min=0)
        return (
            (self.mu - mu_f).square().sum() + self.cov.trace() + cov_f.trace() - 2 * eigenvalues.sqrt().sum()
        ).item()


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The FID formula on two feature sets (N, d), in float64."""
    return frechet_from_stats(*gaussian_stats(real), *gaussian_stats(fake))


def kid(
    real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator, subsets: int = 20, subset_size: int = 500
) -> float:
    """Kernel Inception Distance: the mean over `subsets` random pairs of subsets (without
    replacement, `subset_size` each, at most the smaller set) of the unbiased MMD² with
    k(x, y) = (xᵀy / d + 1)³ — torchmetrics' `poly_mmd`, drawn from `generator`."""
    from torchmetrics.image.kid import poly_mmd  # imported here: ~2 s, which most callers never need

    size = min(subset_size, len(real), len(fake))
    values = []
    for _ in range(subsets):
        r = real[torch.randperm(len(real), generator=generator)[:size]]
        f = fake[torch.randperm(len(fake), generator=generator)[:size]]
        values.append(poly_mmd(r.double(), f.double()))
    return torch.stack(values).mean().item()


def kid_resampler(
    real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator
) -> Callable[[torch.Tensor], float]:
    """KID of resampled fake points against one random subset of `real` as large as `fake`,
    with the three kernel matrices computed once: `resampler(idx)` is the unbiased MMD² of
    that subset and fake[idx] (repeated indices count as distinct points, as bootstrap draws
    do), in O(n²) per call. For `bootstrap_ci`."""
    from torchmetrics.image.kid import poly_kernel

    n = len(fake)
    subset = real[torch.randperm(len(real), generator=generator)[:n]].double()
    fake = fake.double()
    k_rr, k_ff, k_rf = poly_kernel(subset, subset), poly_kernel(fake, fake), poly_kernel(subset, fake)
    real_term = (k_rr.sum() - k_rr.diagonal().sum()) / (n * (n - 1))
    cross_columns, diagonal = k_rf.sum(0), k_ff.diagonal()

    def resampled(idx: torch.Tensor) -> float:
        counts = torch.bincount(idx, minlength=n).double()
        fake_term = (counts @ k_ff @ counts - (counts * diagonal).sum()) / (n * (n - 1))
        return (real_term + fake_term - 2 * (cross_columns @ counts) / n**2).item()

    return resampled


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) between rows, in float64, computed in row batches."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return torch.cat([torch.cdist(chunk, b) for chunk in a.split(batch)])


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    distances = pairwise_distances(features, features)
    distances.fill_diagonal_(float("inf"))
    return distances.kthvalue(k, dim=1).values


def inside_manifold(points: torch.Tensor, manifold: torch.Tensor, k: int) -> torch.Tensor:
    """For each of `points`: is it within the k-NN radius of at least one point of `manifold`?"""
    radii = knn_radii(manifold, k)
    return (pairwise_distances(points, manifold) <= radii[None]).any(1)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point indicators of Kynkäänniemi et al.'s estimate: (each fake point inside the real
    manifold, each real point inside the fake manifold). Their means are precision and recall."""
    return inside_manifold(fake, real, k), inside_manifold(real, fake, k)


def nearest_neighbours(
    queries: torch.Tensor, reference: torch.Tensor, batch: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance from each query row to its nearest row of `reference` (pixels or features),
    in float32, and that row's index: 1,000 images against MNIST's 60,000 training images is
    94 GFLOP."""
    reference = reference.flatten(1).float()
    nearest = [torch.cdist(chunk.flatten(1).float(), reference).min(1) for chunk in queries.split(batch)]
    return torch.cat([n.values for n in nearest]), torch.cat([n.indices for n in nearest])


def memorization_threshold(held_out_distances: torch.Tensor, quantile: float = 0.01) -> float:
    """The distance below which a sample counts as a copy of a training image: the `quantile`
    of the nearest-training-image distances of held-out real digits (the test set), which by
    construction are not copies. So a set of genuinely new digits scores ≈ `quantile`, and
    copies of training images (distance 0) score 1."""
    return torch.quantile(held_out_distances.double(), quantile).item()


def bootstrap_ci(
    statistic: Callable[[torch.Tensor], float],
    n: int,
    generator: torch.Generator,
    resamples: int = 200,
    level: float = 0.95,
    estimate: float | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(indices)`: `resamples` draws of n indices
    with replacement from range(n), the (1 − level)/2 and (1 + level)/2 quantiles of the
    statistic over them.

    With `estimate` (the statistic on all n points), the interval is moved by the bootstrap's
    bias, mean(resampled) − estimate. FID needs it: a resample repeats about a third of
    its points, which inflates the distance as fewer points would (by about the floor), and
    the plain percentile interval would then lie above the estimate it is meant to bracket."""
    # One thread: the statistics are small (a 256 × 256 eigenproblem at most), where a thread
    # pool costs more than it gives (eigvalsh 3 ms on one thread, 16 ms on two beside
    # another busy process), and the numbers do not then depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        draws = [statistic(torch.randint(0, n, (n,), generator=generator)) for _ in range(resamples)]
    finally:
        torch.set_num_threads(threads)
    values = torch.tensor(draws, dtype=torch.float64)
    if estimate is not None:
        values -= values.mean() - estimate
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def mean_ci(indicators: torch.Tensor, generator: torch.Generator, resamples: int = 1000) -> tuple[float, float]:
    """Bootstrap interval of the mean of per-point values (accuracy, precision, recall, memorized share)."""
    values = indicators.double()
    return bootstrap_ci(lambda idx: values[idx].mean().item(), len(values), generator, resamples)
