"""``sample_and_log_prob`` on every model kind: draws with the exact log-density of the
distribution that drew them, which must equal ``log_prob`` at those draws; ``sample`` never
builds a graph and ``rsample`` does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from freeflows import (
    CNF,
    IAF,
    MAF,
    NICE,
    FreeFormFlow,
    Glow,
    MeanFreeNormal,
    PlanarFlow,
    RealNVP,
    ResNet,
    StandardNormal,
)
from freeflows.nets.velocity import TimeMLP

F64 = torch.float64


def _perturb(model: nn.Module, std: float = 0.2) -> nn.Module:
    """Random non-trivial weights (zero-initialised output layers would make many maps identity)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def _build(kind: str, d: int = 3, condition_dim: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    if kind == "planar":
        return _perturb(PlanarFlow(d, condition_dim, transforms=3)).double()
    if kind == "nice":
        return _perturb(NICE(d, condition_dim, transforms=2, hidden=16)).double()
    if kind == "realnvp":
        return _perturb(RealNVP(d, condition_dim, transforms=2, hidden=16)).double()
    if kind == "glow":
        model = _perturb(Glow(d, condition_dim, steps=2, hidden=16)).double()
        c = None if condition_dim is None else torch.randn(64, condition_dim, dtype=F64)
        model.log_prob(torch.randn(64, d, dtype=F64), c)  # ActNorm's data-dependent initialisation
        return model
    if kind == "maf":
        return _perturb(MAF(d, condition_dim, transforms=2, hidden=16)).double()
    if kind == "iaf":
        return _perturb(IAF(d, condition_dim, transforms=2, hidden=16)).double()
    if kind == "cnf":
        velocity = _perturb(TimeMLP(d, hidden=16, layers=2, condition_dim=condition_dim or 0), 0.3)
        return CNF.from_velocity(
            velocity, StandardNormal(d), rtol=1e-9, atol=1e-9, condition_dim=condition_dim
        ).double()
    if kind == "fff":
        cf = condition_dim or 0
        enc = _perturb(ResNet(d, 16, blocks=2, condition_dim=cf), 0.1)
        dec = _perturb(ResNet(d, 16, blocks=2, condition_dim=cf), 0.1)
        return FreeFormFlow(enc, dec, StandardNormal(d), condition_dim=condition_dim).double()
    raise AssertionError(kind)


KINDS = ("planar", "nice", "realnvp", "glow", "maf", "iaf", "cnf", "fff")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("conditional", [False, True])
def test_sample_and_log_prob_matches_log_prob(kind, conditional):
    model = _build(kind, condition_dim=2 if conditional else None)
    c = torch.randn(2, dtype=F64) if conditional else None
    torch.manual_seed(1)
    x, log_q = model.sample_and_log_prob(32, c)
    assert x.shape == (32, 3) and log_q.shape == (32,)
    assert not x.requires_grad and not log_q.requires_grad
    with torch.no_grad():
        ref = model.log_prob(x, c)
    tol = 1e-6 if kind == "cnf" else 1e-8  # the CNF's two solves agree to the ODE tolerance
    torch.testing.assert_close(log_q, ref, rtol=tol, atol=tol)
    # the draws are the model's: same seed, same draws as sample()
    torch.manual_seed(1)
    torch.testing.assert_close(model.sample(32, c), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_has_no_graph_and_rsample_has_one(kind):
    model = _build(kind)
    assert not model.sample(4).requires_grad
    assert model.rsample(4).requires_grad


def test_cnf_sample_and_log_prob_on_a_mean_free_latent():
    torch.manual_seed(0)
    velocity = _perturb(TimeMLP(6, hidden=16, layers=2), 0.3)
    model = CNF.from_velocity(velocity, MeanFreeNormal(3, 2), rtol=1e-9, atol=1e-9).double()
    x, log_q = model.sample_and_log_prob(8)
    with torch.no_grad():
        torch.testing.assert_close(log_q, model.log_prob(x), rtol=1e-6, atol=1e-6)


def test_augmented_cnf_refuses_sample_and_log_prob():
    model = CNF.from_velocity(TimeMLP(5, hidden=8, layers=2), StandardNormal(3), augment_dims=2)
    with pytest.raises(ValueError, match="augment_dims"):
        model.sample_and_log_prob(4)
