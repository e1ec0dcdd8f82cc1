"""Probe vectors have identity second moment, and bad options are refused."""

import pytest
import torch

from freeflows.distributions import mean_free_basis
from freeflows.hutchinson import hutchinson_vectors


@pytest.mark.parametrize("mode", ["gaussian", "rademacher", "sphere"])
def test_second_moment_is_identity(mode):
    d, n = 5, 40000
    g = torch.Generator().manual_seed(0)
    v = hutchinson_vectors(1, n, d, mode, dtype=torch.float64, generator=g)[0]
    outer = v[:, :, None] * v[:, None, :]
    mean, se = outer.mean(0), outer.std(0) / n**0.5
    # sphere/rademacher diagonals are exactly 1 (se = 0): allow a tiny absolute slack.
    assert ((mean - torch.eye(d, dtype=torch.float64)).abs() <= 4 * se + 1e-12).all()


def test_sphere_samples_are_orthogonal_and_exact_at_full_rank():
    d = 6
    v = hutchinson_vectors(d, 3, d, "sphere", dtype=torch.float64)  # [k, B, d]
    for b in range(3):
        gram = v[:, b] @ v[:, b].T
        torch.testing.assert_close(gram, d * torch.eye(d, dtype=torch.float64))
    # with k = d orthogonal probes, the mean of v^T A v is exactly tr(A)
    a = torch.randn(d, d, dtype=torch.float64)
    est = torch.einsum("kbi,ij,kbj->b", v, a, v) / d
    torch.testing.assert_close(est, torch.full((3,), a.trace().item(), dtype=torch.float64))


def test_basis_projects_into_subspace():
    q = mean_free_basis(4, 2)
    v = hutchinson_vectors(3, 50, 6, "gaussian", basis=q, dtype=torch.float64)
    com = v.reshape(3, 50, 4, 2).mean(2)
    assert com.abs().max() < 1e-12


def test_bad_options():
    with pytest.raises(ValueError, match="unknown Hutchinson mode"):
        hutchinson_vectors(1, 2, 3, "cauchy")
    with pytest.raises(ValueError, match="exceeds the dimension"):
        hutchinson_vectors(4, 2, 3, "sphere")
    with pytest.raises(ValueError, match="positive integer"):
        hutchinson_vectors(0, 2, 3, "gaussian")
