"""Shared sample sets for the C2ST tests (tests/test_sbi.py, tests/test_c2st_batched.py)."""

from __future__ import annotations

import torch


def two_moons_pairs(n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Reference posterior of two_moons (observation 1) against: another part of itself; itself
    blurred by 0.3 standard deviations; the Gaussian with its mean and covariance."""
    from freeflows.data.sbi import reference_posterior

    reference = reference_posterior("two_moons", 1)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(reference.shape[0], generator=g)
    a, b = reference[perm[:n]], reference[perm[n : 2 * n]]
    blurred = b + 0.3 * reference.std(0) * torch.randn(b.shape, generator=g)
    gaussian = torch.distributions.MultivariateNormal(reference.mean(0), torch.cov(reference.T))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        moment_matched = gaussian.sample((n,))
    return {"same": (a, b), "blurred": (a, blurred), "gaussian": (a, moment_matched)}
