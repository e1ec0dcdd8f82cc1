"""Tests of the ODE transform (freeflows.transforms.ode): the flow map and its log-determinant,
the exact and Hutchinson traces, the solver wrapper and its failures, NFE counts, augmentation.

Statistical tests use fixed seeds and a tolerance of 4 standard errors.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

from freeflows import StandardNormal
from freeflows.continuous import CNF
from freeflows.contract import NumericalError
from freeflows.distributions import mean_free_basis
from freeflows.jacobian import batch_jacobian
from freeflows.nets.velocity import TimeMLP
from freeflows.transforms.ode import (
    Dynamics,
    NFECounter,
    ODETransform,
    augment,
    augmented_basis,
    check_solver,
    exact_trace,
    hutchinson_trace,
    normal_log_prob,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed_and_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def random_field(features: int = 2, scale: float = 1.0, hidden: int = 16, seed: int = 0) -> TimeMLP:
    """An untrained TimeMLP with non-zero output layer, in float64, weights scaled by ``scale``."""
    torch.manual_seed(seed)
    net = TimeMLP(features, hidden=hidden, layers=2, zero_init=False).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def tight(net: nn.Module, latent: nn.Module, **kw) -> CNF:
    return CNF.from_velocity(net, latent.double(), rtol=1e-8, atol=1e-8, **kw)


def within_se(samples: Tensor, target: float | Tensor, k: float = 4.0) -> tuple[bool, float, float]:
    mean = samples.mean()
    se = samples.std() / math.sqrt(samples.numel())
    return bool((mean - target).abs() < k * se), float(mean), float(se)


class ConditionalField(nn.Module):
    """A non-linear conditional field, f(t, x, c) = tanh(W x + c_0) + t x."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(0.8 * torch.randn(d, d, dtype=F64))

    def forward(self, t: Tensor, x: Tensor, c: Tensor) -> Tensor:
        return torch.tanh(x @ self.w.T + c[:, :1]) + t * x


# -- the transform API ----------------------------------------------------------------------


def test_log_det_matches_jacrev_slogdet_and_round_trip():
    """log_det of the forward map equals log|det| of the Jacobian of that map (reverse mode through
    the solver, float64, rtol 1e-10; torch.autograd.functional because torchdiffeq's autograd
    Functions do not run under torch.func), with a condition; inverse(forward(x)) == x."""
    field = ConditionalField(3)
    t = ODETransform(field, (3,), rtol=1e-10, atol=1e-10, t1=0.9)
    x = torch.randn(4, 3, dtype=F64)
    c = torch.randn(4, 1, dtype=F64)
    z, log_det = t(x, c)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda xi, i=i: t(xi[None], c[i : i + 1])[0][0], x[i])
        assert torch.allclose(log_det[i], torch.linalg.slogdet(jac).logabsdet, atol=1e-7)
    assert torch.allclose(t.inverse(z, c), x, atol=1e-7)
    assert log_det.abs().max() > 0.1  # not the identity


def test_hutchinson_forward_is_an_unbiased_log_det():
    t = ODETransform(random_field(scale=1.5), (2,), rtol=1e-8, atol=1e-8, trace="hutchinson")
    x = torch.tensor([[0.5, -1.0]], dtype=F64)
    with torch.no_grad():
        exact = t.solve_density(x, trace="exact")[1]
        _, est = t(x.expand(2000, -1))
    ok, mean, se = within_se(est, exact[0])
    assert ok and se > 1e-4, (mean, float(exact[0]), se)


# -- the trace estimators -------------------------------------------------------------------


def test_exact_trace_agrees_with_batch_jacobian_and_the_subspace():
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    x = torch.randn(5, 6, dtype=F64)
    jac = batch_jacobian(net, x)
    f, trace, frobenius = exact_trace(net, x)
    assert torch.allclose(f, net(x))
    assert torch.allclose(trace, jac.diagonal(dim1=-2, dim2=-1).sum(-1))
    assert torch.allclose(frobenius, jac.square().sum((-2, -1)))
    q = mean_free_basis(3, 2)
    _, sub_trace, sub_frobenius = exact_trace(net, x, projector=q @ q.T, chunk_size=2)
    assert torch.allclose(sub_trace, torch.einsum("di,bde,ei->b", q, jac, q))
    assert torch.allclose(sub_frobenius, (q.T @ jac).square().sum((-2, -1)))
    assert not torch.allclose(sub_trace, trace)


def test_hutchinson_trace_is_unbiased_for_a_fixed_matrix():
    a = torch.randn(4, 4, dtype=F64)
    x = torch.randn(1, 4, dtype=F64).expand(6000, -1)
    probe = torch.randn(6000, 4, dtype=F64)
    with torch.no_grad():
        f, trace, frobenius = hutchinson_trace(lambda x: x @ a.T, x, probe)
    assert not f.requires_grad  # no graph when autograd is off
    for est, want in ((trace, torch.trace(a)), (frobenius, a.square().sum())):
        ok, mean, se = within_se(est, want)
        assert ok, (mean, float(want), se)


def test_dynamics_checks_the_velocity_shape():
    rhs = Dynamics(lambda t, x: x[:, :1], (2,), False, NFECounter(), "transform")
    with pytest.raises(ValueError, match="keep the shape"):
        rhs(torch.tensor(0.0), torch.zeros(3, 2))


# -- the solver -----------------------------------------------------------------------------


def test_nfe_counts_by_direction():
    """rk4 with 4 steps: 16 evaluations per solve, counted as forward or sample."""
    t = ODETransform(random_field(), (2,), solver="rk4", step_size=0.25)
    z, _ = t(torch.randn(3, 2, dtype=F64))
    assert (t.counter.forward, t.counter.sample) == (16, 0)
    t.inverse(z)
    assert (t.counter.forward, t.counter.sample) == (16, 16)


def test_check_solver_rejects_bad_settings():
    check_solver("dopri5", rtol=1e-3, atol=1e-3)
    for kwargs, match in [
        ({"solver": "leapfrog"}, "unknown solver"),
        ({"solver": "rk4"}, "step_size"),
        ({"solver": "dopri5", "rtol": 0}, "rtol must be"),
        ({"solver": "dopri5", "max_num_steps": 0}, "max_num_steps"),
        ({"solver": "dopri5", "t1": -1.0}, "t1 must be"),
        ({"solver": "dopri5", "extra_tolerances": {"train_atol": -1}}, "train_atol must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_solver(**kwargs)


# -- augmentation ---------------------------------------------------------------------------


def test_augmentation_helpers():
    h, a = augment(torch.zeros(3, 2), 0)
    assert h.shape == (3, 2) and a.shape == (3, 0)
    gen = torch.Generator().manual_seed(0)
    h, a = augment(torch.ones(3, 2), 2, gen)
    assert torch.equal(h[:, :2], torch.ones(3, 2)) and torch.equal(h[:, 2:], a)
    assert torch.allclose(normal_log_prob(a), torch.distributions.Normal(0.0, 1.0).log_prob(a).sum(-1))
    q = mean_free_basis(2, 1)
    full, m = augmented_basis(q, 2, 1)
    assert m == 2 and torch.allclose(full.T @ full, torch.eye(2, dtype=q.dtype))
    assert augmented_basis(None, 2, 3) == (None, 5)


# -- moved from the CNF tests: traces and solves through the model ---------------------------


class Drift(nn.Module):
    """:math:`f(t, x) = t \\mathbf 1`, independent of x: z = x + t1²/2 and the trace is 0."""

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return t * torch.ones_like(x)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_field_that_ignores_x(trace):
    cnf = tight(Drift(), StandardNormal(2), trace=trace)
    x = torch.randn(5, 2, dtype=F64)
    out = cnf.integrate(x)
    assert torch.allclose(out["z"], x + 0.5, atol=1e-7)
    assert torch.allclose(out["log_prob"], normal_log_prob(x + 0.5), atol=1e-7)


# -- 2. Hutchinson ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gaussian", "rademacher"])
def test_hutchinson_trace_is_unbiased(mode):
    """Mean over 3000 independent probes of the Hutchinson integral ∫ vᵀJv dt is within 4 SE of
    the exact ∫ tr J dt, at three points, for a random non-linear field."""
    cnf = tight(random_field(scale=1.5), StandardNormal(2), hutchinson=mode)
    x0 = torch.tensor([[0.5, -1.0], [2.0, 0.3], [-1.2, -0.4]], dtype=F64)
    reps = 3000
    with torch.no_grad():
        exact = cnf.integrate(x0, trace="exact")["trace_integral"]
        est = cnf.integrate(x0.repeat_interleave(reps, 0), trace="hutchinson")["trace_integral"]
    est = est.reshape(3, reps)
    for i in range(3):
        ok, mean, se = within_se(est[i], exact[i])
        assert ok, (i, mean, float(exact[i]), se)
        assert est[i].std() > 1e-3  # the estimate is random, so the check is not vacuous
    # log_prob(trace="hutchinson") is the same estimate: its mean over probes is the exact log p
    with torch.no_grad():
        lp = cnf.log_prob(x0[:1].expand(reps, -1), trace="hutchinson")
        ok, mean, se = within_se(lp, cnf.log_prob(x0[:1])[0])
    assert ok, (mean, se)


class NaNAfterHalfway(nn.Module):
    """A field that turns non-finite at t > 0.5, as a diverged network would."""

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return x * torch.where(t > 0.5, torch.tensor(float("nan")), torch.tensor(1.0))


def test_failed_solves_raise_numerical_error():
    """torchdiffeq's assertions (dt underflow, too many steps) become one NumericalError that
    names the solver and tolerances; an unrelated AssertionError is not swallowed."""
    x = torch.randn(4, 2)
    with pytest.raises(NumericalError, match=r"underflow in dt.*dopri5, rtol=1e-05"):
        CNF.from_velocity(NaNAfterHalfway(), StandardNormal(2)).log_prob(x)
    with pytest.raises(NumericalError, match="underflow in dt"):
        CNF.from_velocity(NaNAfterHalfway(), StandardNormal(2), trace="hutchinson").loss(x)
    tight = CNF.from_velocity(
        random_field(), StandardNormal(2).double(), rtol=1e-10, atol=1e-10, max_num_steps=2
    )
    with pytest.raises(NumericalError, match="max_num_steps exceeded"):
        tight.log_prob(torch.randn(4, 2, dtype=F64))
    # the same model solves once the cap is lifted
    tight.max_num_steps = None
    assert torch.isfinite(tight.log_prob(torch.randn(4, 2, dtype=F64))).all()
    with pytest.raises(ValueError, match="max_num_steps"):
        CNF.from_velocity(random_field(), StandardNormal(2), max_num_steps=0)


class TimeRecorder(nn.Module):
    """A linear field that records every time it is evaluated at."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.times.append(float(t))
        return -0.5 * x


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_adaptive_solves_stay_inside_the_time_interval(trace):
    """dopri5 lands its last step on the end time: the field is never evaluated past t1 (density
    direction) or before 0 (sampling), where a time-conditioned net was never trained."""
    field = TimeRecorder()
    cnf = CNF.from_velocity(field, StandardNormal(2), trace=trace, t1=0.7, rtol=1e-3, atol=1e-3)
    cnf.log_prob(3 * torch.randn(16, 2))
    assert len(field.times) > 6 and max(field.times) <= 0.7 + 1e-6 and min(field.times) >= -1e-6
    field.times.clear()
    cnf.sample(16)
    assert len(field.times) > 6 and max(field.times) <= 0.7 + 1e-6 and min(field.times) >= -1e-6


def test_import_freeflows_does_not_import_torchdiffeq():
    code = "import sys, freeflows; assert 'torchdiffeq' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
