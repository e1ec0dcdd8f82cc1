"""Planar flows: the invertibility constraint, the numerical inverse, and its gradients."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from freeflows.flows import PlanarFlow
from freeflows.transforms import Planar, solve_planar

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reparametrisation_keeps_wu_above_minus_one():
    torch.manual_seed(0)
    t = Planar(4).double()
    with torch.no_grad():
        t.u.copy_(-50 * t.w)  # w^T u very negative: the raw map would not be invertible
    u_hat, w, _ = t.params(None)
    wu = (u_hat * w).sum()
    assert wu >= -1 + 0.99e-4 and wu < -1 + 1.01e-4  # the floor -1 + MIN_SLOPE, not -1
    with torch.no_grad():
        t.u.copy_(3 * t.w)  # w^T u large and positive: m(a) = softplus(a) - 1 is close to a
    u_hat, w, _ = t.params(None)
    raw = (t.u * t.w).sum()
    assert torch.allclose((u_hat * w).sum(), torch.nn.functional.softplus(raw) - 1 + 1e-4, atol=1e-12)
    assert abs((u_hat * w).sum() - (raw - 1)) < 0.01
    # the worst case, tanh' = 1 at w^T z + b = 0, still has a finite log-determinant
    with torch.no_grad():
        t.u.copy_(-1e3 * t.w)
    z = torch.zeros(1, 4, dtype=torch.float64) - t.b
    _, log_det = t(t.inverse(z))
    assert torch.isfinite(log_det).all()


@pytest.mark.parametrize("wu_scale", [-50.0, -0.5, 0.0, 2.0, 40.0])
def test_solver_on_hard_cases(wu_scale):
    """Nearly singular maps (w^T u -> -1), flat ones and steep ones, far-away inputs."""
    torch.manual_seed(1)
    t = Planar(3).double()
    with torch.no_grad():
        t.u.copy_(wu_scale * t.w / t.w.square().sum() + 0.3 * torch.randn(3, dtype=torch.float64))
        t.b.fill_(0.7)
    z = torch.cat(
        [torch.randn(200, 3, dtype=torch.float64) * 3, 1e3 * torch.randn(5, 3, dtype=torch.float64)]
    )
    x = t.inverse(z)
    z_rec, log_det = t(x)
    assert torch.allclose(z_rec, z, atol=1e-8, rtol=1e-10)
    assert torch.isfinite(log_det).all()


def test_solver_root_is_accurate():
    y = torch.linspace(-20, 20, 101, dtype=torch.float64)
    wu = torch.full_like(y, -1 + 1e-9)
    b = torch.full_like(y, 0.3)
    a = solve_planar(y, wu, b, tol=1e-13)
    assert (a + wu * torch.tanh(a + b) - y).abs().max() < 1e-11


def test_log_prob_gradients_match_finite_differences():
    """gradcheck: the gradients of the (numerically inverted) log-density with respect to every
    parameter and to the data agree with central finite differences."""
    torch.manual_seed(2)
    flow = PlanarFlow(2, condition_dim=2, transforms=3).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    names = [n for n, _ in flow.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in flow.parameters())
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 2, dtype=torch.float64)

    def log_prob(x, *values):
        return functional_call(flow, dict(zip(names, values, strict=True)), (x, c))

    assert torch.autograd.gradcheck(log_prob, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_naive_gradient_would_be_wrong():
    """Evaluating z = x - u tanh(w^T z* + b) at a detached solution z* gives a different, wrong
    gradient: the implicit-function step in Planar.forward is needed (and the check above can fail)."""
    torch.manual_seed(3)
    t = Planar(2).double()
    with torch.no_grad():
        t.u.add_(torch.tensor([0.8, -0.4], dtype=torch.float64))
        t.b.fill_(0.2)
    x = torch.randn(8, 2, dtype=torch.float64)

    def nll_exact():
        z, log_det = t(x)
        return (0.5 * z.square().sum(1) - log_det).sum()

    def nll_naive():
        z_star = t(x)[0].detach()
        u, w, b = t.params(None)
        a = (w * z_star).sum(-1) + b
        z = x - u * torch.tanh(a)[:, None]
        log_det = -torch.log1p((w * u).sum(-1) * (1 - torch.tanh(a) ** 2))
        return (0.5 * z.square().sum(1) - log_det).sum()

    (g_exact,) = torch.autograd.grad(nll_exact(), t.w)
    (g_naive,) = torch.autograd.grad(nll_naive(), t.w)
    # central finite difference along the first coordinate of w
    with torch.no_grad():
        h = 1e-6
        t.w[0] += h
        up = nll_exact()
        t.w[0] -= 2 * h
        down = nll_exact()
        t.w[0] += h
    fd = (up - down) / (2 * h)
    assert abs(g_exact[0] - fd) < 1e-6
    assert abs(g_naive[0] - fd) > 1e-3


def test_float32_density_and_sampling():
    torch.manual_seed(4)
    flow = PlanarFlow(2, transforms=6)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    s = flow.sample(500)
    z, _ = flow.transform(s)
    assert torch.allclose(flow.transform.inverse(z), s, atol=1e-4)
    assert torch.isfinite(flow.log_prob(s)).all()
