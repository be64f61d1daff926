import torch

from ddpm_core.pixels import histogram_tv, intensity_histogram, pixel_metrics, zero_share


def test_zero_share_counts_exact_zeros_only():
    images = torch.tensor([[0, 0, 1, 255], [0, 2, 0, 0]], dtype=torch.uint8)
    assert zero_share(images) == 5 / 8


def test_histogram_sums_to_one_and_counts_each_level():
    images = torch.tensor([0, 0, 7, 255], dtype=torch.uint8)
    hist = intensity_histogram(images)
    assert hist.shape == (256,) and hist.sum().item() == 1.0
    assert hist[0] == 0.5 and hist[7] == 0.25 and hist[255] == 0.25


def test_tv_is_zero_for_equal_histograms_and_one_for_disjoint_values():
    a = torch.randint(0, 256, (100, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    shuffled = a.flatten()[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(1))].view(a.shape)
    assert histogram_tv(a, shuffled) == 0.0  # the same values, other places
    assert histogram_tv(torch.zeros(10, dtype=torch.uint8), torch.full((10,), 3, dtype=torch.uint8)) == 1.0


def test_tv_is_the_share_of_pixels_that_must_change():
    # Real: 80 % black, 20 % white. Samples: 50 % black, 30 % at level 2, 20 % white.
    real = torch.tensor([0] * 80 + [255] * 20, dtype=torch.uint8)
    samples = torch.tensor([0] * 50 + [2] * 30 + [255] * 20, dtype=torch.uint8)
    assert abs(histogram_tv(samples, real) - 0.30) < 1e-12
    metrics = pixel_metrics(samples, real, real)
    assert metrics["zero_pixels_uncond"] == 0.5 and metrics["zero_pixels_cond"] == 0.8 == metrics["zero_pixels_real"]
    assert metrics["pixel_hist_tv_cond"] == 0.0
