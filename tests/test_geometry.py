"""Particle geometry (freeflows.geometry): centring is written once and every user calls it."""

from __future__ import annotations

import pytest
import torch

from freeflows import MeanFreeNormal, geometry
from freeflows.data import mcmc, particles
from freeflows.geometry import center, center_of_mass, interparticle_distances


def test_center_removes_the_centre_of_mass_over_any_batch():
    x = torch.randn(5, 3, 12, dtype=torch.float64)
    out = center(x, 4, 3)
    assert out.shape == x.shape
    assert center_of_mass(out, 4, 3).abs().max() < 1e-12
    assert torch.allclose(out - x, -center_of_mass(x, 4, 3).repeat(1, 1, 4))
    # distances do not change
    assert torch.allclose(interparticle_distances(out, 4, 3), interparticle_distances(x, 4, 3))


def test_masked_center_uses_the_real_particles_only():
    x = torch.tensor([[1.0, 3.0, 100.0], [2.0, 4.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert center(x, 3, 1, mask).tolist() == [[-1.0, 1.0, 98.0], [-2.0, 0.0, 2.0]]
    with pytest.raises(ValueError, match="3 particles in 2-D"):
        center(x, 3, 2)


def test_every_caller_uses_the_one_implementation(monkeypatch):
    calls = []
    original = geometry.center

    def counting(*args, **kwargs):
        calls.append(args[1:3])
        return original(*args, **kwargs)

    monkeypatch.setattr(geometry, "center", counting)
    MeanFreeNormal(3, 2).sample(4)
    assert calls == [(3, 2)]
    assert particles.center is original and mcmc.center is original
