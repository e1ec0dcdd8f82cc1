"""Latents: StandardNormal and the mean-free Gaussian in its (N-1)d-dimensional subspace."""

import math

import pytest
import torch

from freeflows import MeanFreeNormal, StandardNormal
from freeflows.distributions import mean_free_basis


def test_standard_normal_matches_torch():
    p = StandardNormal(3).double()
    z = torch.randn(10, 3, dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(p.log_prob(z), ref)
    assert p.sample(4).shape == (4, 3)


@pytest.mark.parametrize("n,d", [(4, 2), (13, 3), (2, 1)])
def test_basis_is_orthonormal_and_mean_free(n, d):
    q = mean_free_basis(n, d)
    assert q.shape == (n * d, (n - 1) * d)
    torch.testing.assert_close(q.T @ q, torch.eye((n - 1) * d, dtype=torch.float64))
    assert (q.reshape(n, d, -1).sum(0)).abs().max() < 1e-12


@pytest.mark.parametrize("n,d", [(4, 2), (13, 3)])
def test_mean_free_log_prob_matches_subspace_reference(n, d):
    p = MeanFreeNormal(n, d).double()
    x = p.sample(200)
    y = x @ p.basis  # coordinates in the (N-1)d-dimensional subspace
    m = (n - 1) * d
    ref = torch.distributions.MultivariateNormal(
        torch.zeros(m, dtype=torch.float64), torch.eye(m, dtype=torch.float64)
    )
    torch.testing.assert_close(p.log_prob(x), ref.log_prob(y))
    # the normaliser counts (N-1)d, not Nd, degrees of freedom
    torch.testing.assert_close(
        p.log_prob(torch.zeros(1, n * d, dtype=torch.float64)),
        torch.tensor([-0.5 * m * math.log(2 * math.pi)], dtype=torch.float64),
    )


def test_mean_free_integrates_to_one():
    """Importance sampling in subspace coordinates with a wider Gaussian proposal: E_r[p/r] = 1."""
    n, d = 3, 2
    m = (n - 1) * d
    p = MeanFreeNormal(n, d).double()
    g = torch.Generator().manual_seed(0)
    s = 1.5
    y = s * torch.randn(200000, m, generator=g, dtype=torch.float64)
    log_r = torch.distributions.Normal(0.0, s).log_prob(y).sum(1)
    w = (p.log_prob(y @ p.basis.T) - log_r).exp()
    se = w.std() / w.numel() ** 0.5
    assert abs(w.mean().item() - 1.0) < 4 * se.item()


def test_mean_free_samples_have_zero_centre_of_mass():
    p = MeanFreeNormal(5, 3)
    x = p.sample(100).reshape(100, 5, 3)
    assert x.mean(1).abs().max() < 1e-6
    assert x.std() > 0.5


def test_bad_shapes():
    with pytest.raises(ValueError):
        MeanFreeNormal(1, 3)
    with pytest.raises(ValueError):
        StandardNormal(0)
