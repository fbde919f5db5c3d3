"""frechet_distance against the textbook formula with scipy.linalg.sqrtm, and the statistics helpers."""

import numpy as np
import pytest
import scipy.linalg
import torch

from tokpost_fast.metrics import fid_statistics, frechet_distance


def _scipy_fid(mu1, sigma1, mu2, sigma2):
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = covmean.real  # sqrtm returns a complex array when rounding leaves tiny imaginary parts
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _random_stats(rng, dim, n):
    a = rng.standard_normal((dim, dim))
    x = rng.standard_normal((n, dim)) @ a + rng.standard_normal(dim)
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("dim", [1, 8, 64])
def test_matches_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    mu1, s1 = _random_stats(rng, dim, 4 * dim + 16)
    mu2, s2 = _random_stats(rng, dim, 4 * dim + 16)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_scipy_fid(np.atleast_1d(mu1), np.atleast_2d(s1), np.atleast_1d(mu2),
                                            np.atleast_2d(s2)), rel=1e-6)
    assert ours > 0


def test_same_set_is_zero():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.standard_normal((200, 32)) @ rng.standard_normal((32, 32)))
    stats = fid_statistics(features)
    scale = np.trace(stats.sigma)
    assert abs(frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)) < 1e-9 * scale


def test_mismatched_statistics_is_an_error():
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fewer_than_two_images_is_an_error():
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        fid_statistics(torch.zeros(1, 8))
