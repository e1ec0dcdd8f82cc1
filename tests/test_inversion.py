"""Claims of ``freeflows.inversion`` and ``FreeFormFlow(sample_refine_steps=K)``: the iteration
solves f(x) = z, never makes a draw worse, and refined draws follow the encoder's density."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from freeflows import FreeFormFlow, ResNet, StandardNormal
from freeflows.inversion import invert_encoder

D = 3


def _affine_pair(error: float = 0.2) -> tuple[nn.Linear, nn.Linear, torch.Tensor, torch.Tensor]:
    """An affine encoder f(x) = A x + b and a decoder that is its inverse up to a relative
    ``error`` in the matrix (the situation a free-form flow trains towards)."""
    g = torch.Generator().manual_seed(0)
    a = torch.eye(D, dtype=torch.float64) + 0.3 * torch.randn(D, D, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    a_inv = torch.linalg.inv(a)
    noise = torch.randn(D, D, generator=g, dtype=torch.float64)
    perturb = torch.eye(D, dtype=torch.float64) + error * noise / 3
    enc, dec = nn.Linear(D, D).double(), nn.Linear(D, D).double()
    with torch.no_grad():
        enc.weight.copy_(a), enc.bias.copy_(b)
        dec.weight.copy_(a_inv @ perturb), dec.bias.copy_(-(a_inv @ perturb) @ b)
    return enc, dec, a, b


def _nets(enc: nn.Module, dec: nn.Module):
    return (lambda x, c: enc(x)), (lambda z, c: dec(z))


def test_converges_to_the_encoders_inverse():
    enc, dec, a, b = _affine_pair()
    z = torch.randn(256, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.solve(a, (z - b).T).T
    x0, r0 = invert_encoder(*_nets(enc, dec), z, steps=0)
    torch.testing.assert_close(x0, dec(z).detach())  # zero steps is the plain decoder draw
    assert r0.median().item() > 0.05  # the decoder alone is visibly off
    x, r = invert_encoder(*_nets(enc, dec), z, steps=40)
    assert r.max().item() < 1e-9
    torch.testing.assert_close(x, exact, rtol=0, atol=1e-8)
    _, r5 = invert_encoder(*_nets(enc, dec), z, steps=5)
    assert (r5 <= r0).all() and r5.median().item() < 0.1 * r0.median().item()


def test_shorter_steps_rescue_an_overshooting_decoder():
    # g = 2.5 f^-1 overshoots: the full step x + g(z) - g(f(x)) multiplies the error by -1.5 and
    # diverges. With the step halved (alpha = 1/2) the factor is 1 - 1.25 = -0.25, so it converges.
    enc, dec, a, b = _affine_pair(error=0.0)
    with torch.no_grad():
        dec.weight.mul_(2.5), dec.bias.mul_(2.5)
    z = torch.randn(64, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x, r = invert_encoder(*_nets(enc, dec), z, steps=60)
    assert r.max().item() < 1e-9
    torch.testing.assert_close(x, torch.linalg.solve(a, (z - b).T).T, rtol=0, atol=1e-8)


def test_a_diverging_iteration_never_leaves_the_best_iterate():
    # A decoder with the wrong sign makes every step overshoot: the residual must never grow and
    # the draws must stay finite.
    enc, dec, _, _ = _affine_pair()
    with torch.no_grad():
        dec.weight.mul_(-3.0)
    z = torch.randn(64, D, dtype=torch.float64)
    _, r0 = invert_encoder(*_nets(enc, dec), z, steps=0)
    x, r = invert_encoder(*_nets(enc, dec), z, steps=20)
    assert torch.isfinite(x).all() and (r <= r0).all()
    torch.testing.assert_close(r, (enc(x) - z).norm(dim=1).detach())


def test_tol_stops_early_and_bad_arguments_are_value_errors():
    enc, dec, _, _ = _affine_pair()
    calls = []

    def counting_encode(x, c):
        calls.append(1)
        return enc(x)

    z = torch.randn(8, D, dtype=torch.float64)
    invert_encoder(counting_encode, lambda z, c: dec(z), z, steps=100, tol=1e-3)
    assert 1 < len(calls) < 30
    with pytest.raises(ValueError, match="steps"):
        invert_encoder(*_nets(enc, dec), z, steps=-1)
    with pytest.raises(ValueError, match="tol"):
        invert_encoder(*_nets(enc, dec), z, tol=float("nan"))
    with pytest.raises(ValueError, match="sample_refine_steps"):
        FreeFormFlow(ResNet(D), ResNet(D), StandardNormal(D), sample_refine_steps=-2)


def test_refined_draws_follow_the_encoders_density():
    # f(x) = A x + b with z ~ N(0, I) makes the encoder's density N(A^-1(-b), (A^T A)^-1). With an
    # imperfect decoder, plain draws have the wrong covariance; refined draws match it. The test
    # compares mean and covariance with tolerances of 5 standard errors.
    enc, dec, a, b = _affine_pair(error=0.3)
    flow = FreeFormFlow(enc, dec, StandardNormal(D).double())
    n = 20_000
    mean = -torch.linalg.solve(a, b)
    cov = torch.linalg.inv(a.T @ a)
    sd = cov.diagonal().sqrt()

    def errors(draws: torch.Tensor) -> tuple[float, float]:
        mean_err = ((draws.mean(0) - mean) / (sd / math.sqrt(n))).abs().max().item()
        # standard error of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)
        se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
        cov_err = ((torch.cov(draws.T) - cov) / se).abs().max().item()
        return mean_err, cov_err

    g = torch.Generator().manual_seed(3)
    plain = flow.sample(n, generator=g).detach()
    flow.sample_refine_steps = 30
    refined = flow.sample(n, generator=torch.Generator().manual_seed(3)).detach()
    assert max(errors(refined)) < 5.0
    assert errors(plain)[1] > 20.0  # the check can fail: the plain decoder's covariance is off


def test_conditional_sampling_with_refinement():
    torch.manual_seed(0)
    flow = FreeFormFlow(
        ResNet(D, condition_dim=2),
        ResNet(D, condition_dim=2),
        StandardNormal(D),
        condition_dim=2,
        sample_refine_steps=3,
    )
    c = torch.tensor([0.5, -1.0])
    draws = flow.sample(50, c, generator=torch.Generator().manual_seed(4))
    z = StandardNormal(D).sample(50, generator=torch.Generator().manual_seed(4))
    expected, _ = invert_encoder(flow.encode, flow.decode, z, c.expand(50, 2), steps=3)
    torch.testing.assert_close(draws, expected)
    assert not draws.requires_grad
