"""Tests of the density-mass diagnostic (freeflows.eval.mass).

The estimator is checked on densities of known mass (a Gaussian, the same Gaussian scaled by 0.7,
a mean-free Gaussian on a subspace), then used to check that every exact flow and the CNF, with
random non-trivial weights, integrate to one. Statistical checks allow 4 standard errors (a false
alarm rate of about 6e-5 per check) plus ``FLOOR`` for the float32 rounding of the densities.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import freeflows
from freeflows import CNF, MeanFreeNormal, StandardNormal
from freeflows.eval import GaussianMixtureProposal, MassEstimate, combine_masses, density_mass
from freeflows.nets.velocity import TimeMLP

K = 4.0
FLOOR = 1e-6  # float32 rounding of the evaluated densities (measured below 2e-7 here)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def assert_mass(estimate: MassEstimate, expected: float, max_stderr: float = 0.05) -> None:
    """``expected`` within K errors, and an error small enough for the check to mean something."""
    assert math.isfinite(estimate.mass) and estimate.unsolved == 0, estimate
    assert estimate.stderr < max_stderr * expected, estimate
    assert abs(estimate.mass - expected) <= K * estimate.stderr + FLOOR, estimate


def gaussian(d: int, seed: int = 0) -> torch.distributions.MultivariateNormal:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g) * 0.5 + torch.eye(d)
    mean = torch.randn(d, generator=g)
    return torch.distributions.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(a @ a.T))


@pytest.mark.parametrize(
    "d, method", [(1, "quadrature"), (2, "quadrature"), (4, "importance"), (6, "importance")]
)
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_known_gaussian_mass(d, method, scale):
    dist = gaussian(d)
    data = dist.sample((3000,))
    est = density_mass(lambda x: dist.log_prob(x) + math.log(scale), data)
    assert est.method == method and est.n == (2001 if d == 1 else 201**2 if d == 2 else 4000)
    assert_mass(est, scale)


def test_importance_sampling_is_unbiased():
    """The mean of 40 independent 200-draw estimates is the mass within K of its standard error
    (the spread of the 40), and each reported stderr agrees with that spread to within 30 %."""
    dist = gaussian(4, seed=1)
    data = dist.sample((2000,))
    masses, stderrs = [], []
    for seed in range(40):
        est = density_mass(lambda x: dist.log_prob(x) + math.log(0.7), data, evaluations=200, seed=seed)
        masses.append(est.mass)
        stderrs.append(est.stderr)
    m = torch.tensor(masses, dtype=torch.float64)
    assert abs(m.mean().item() - 0.7) <= K * m.std().item() / math.sqrt(len(masses))
    assert abs(sum(stderrs) / len(stderrs) / m.std().item() - 1) < 0.3


def test_nan_rows_are_zero_and_counted():
    """A log_prob that gives NaN on half the space (an unconverged solve) has half the mass."""
    for d in (2, 4):
        dist = torch.distributions.MultivariateNormal(torch.zeros(d), torch.eye(d))

        def half(x: Tensor, dist=dist) -> Tensor:
            lp = dist.log_prob(x)
            return torch.where(x[:, 0] > 0, torch.full_like(lp, math.nan), lp)

        est = density_mass(half, dist.sample((2000,)))
        assert 0.3 * est.n < est.unsolved < 0.7 * est.n
        assert abs(est.mass - 0.5) <= K * est.stderr + FLOOR, est


@pytest.mark.parametrize("n_particles, n_dims", [(3, 1), (4, 2)])
def test_mass_on_a_subspace(n_particles, n_dims):
    """A mean-free Gaussian has mass 1 on its (N-1)d-dimensional subspace, which the estimator
    integrates over when given the latent's basis (quadrature for 2, importance sampling for 6);
    over the full space it has none (the integrand is not a density there)."""
    latent = MeanFreeNormal(n_particles, n_dims)
    data = latent.sample(3000)
    est = density_mass(latent.log_prob, data, basis=latent.basis)
    assert est.method == ("quadrature" if latent.dim <= 2 else "importance")
    assert_mass(est, 1.0)
    wrong = density_mass(latent.log_prob, data)  # integrated over R^{Nd}: far from one
    assert abs(wrong.mass - 1) > 10 * wrong.stderr


def test_quadrature_error_covers_an_unresolved_density():
    """A bump narrower than the data, on grids from a few nodes per width to many: the error
    estimate covers the quadrature's miss (from a node spacing of about twice the bump's
    standard deviation), and shrinks as the grid resolves the bump."""
    dist = torch.distributions.Normal(torch.tensor([0.013, 0.0]), torch.tensor([0.15, 1.0]))
    data = torch.randn(1000, 2)
    errors = []
    for nodes in (41, 81, 161):
        est = density_mass(lambda x: dist.log_prob(x).sum(dim=1), data, evaluations=nodes**2)
        assert abs(est.mass - 1) <= est.stderr + FLOOR, est
        errors.append(est.stderr)
    assert errors[0] > 0.01 and errors[-1] < FLOOR


def test_quadrature_error_covers_a_truncated_tail():
    """Data in a small region and a much wider density: the truncation part reports the loss."""
    dist = torch.distributions.Normal(0.0, 1.0)
    for width in (0.2, 1.0, 2.0):
        data = (torch.rand(500, 1) - 0.5) * width
        est = density_mass(lambda x: dist.log_prob(x[:, 0]), data)
        assert est.mass < 1 and abs(est.mass - 1) <= est.stderr, est


def test_combine_and_mixture():
    a = MassEstimate(1.0, 0.03, 100, 1, "importance")
    b = MassEstimate(0.8, 0.04, 100, 2, "importance")
    c = combine_masses([a, b])
    assert c.mass == pytest.approx(0.9) and c.stderr == pytest.approx(0.025)
    assert (c.n, c.unsolved, c.method) == (200, 3, "importance")
    assert a.log_mass == 0.0 and a.log_mass_stderr == pytest.approx(0.03)
    y = torch.randn(500, 3, dtype=torch.float64)
    mix = GaussianMixtureProposal.fit(y).mixed_with(GaussianMixtureProposal.fit(y + 30, (2.0,), (1.0,)), 0.2)
    draws = mix.sample(20000, torch.Generator().manual_seed(0))
    assert ((draws[:, 0] > 15).double().mean() - 0.2).abs() < 0.02
    # log_prob is a density: a 3-D importance estimate of its own mass is exactly 1
    est = density_mass(lambda x: mix.log_prob(x.double()), draws.float())
    assert est.mass == pytest.approx(1.0, abs=0.1)


# -- every model kind integrates to one -------------------------------------------------------

CLASSIC = {
    "planar": lambda d: freeflows.PlanarFlow(d, transforms=4),
    "nice": lambda d: freeflows.NICE(d, hidden=16),
    "realnvp": lambda d: freeflows.RealNVP(d, hidden=16),
    "glow": lambda d: freeflows.Glow(d, hidden=16),
    "maf": lambda d: freeflows.MAF(d, hidden=16),
    "iaf": lambda d: freeflows.IAF(d, hidden=16),
}


def random_flow(kind: str, d: int, noise: float = 0.1) -> torch.nn.Module:
    """A classic flow with random weights: ActNorm initialised on standard normal data, then every
    parameter perturbed by ``noise`` so that no layer is the identity."""
    torch.manual_seed(1)
    model = CLASSIC[kind](d)
    with torch.no_grad():
        model.log_prob(torch.randn(256, d))
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model.eval()


def assert_nontrivial(model: torch.nn.Module, data: Tensor) -> None:
    """The model's density is not its latent's (the check would be void otherwise)."""
    with torch.no_grad():
        gap = model.log_prob(data) - model.latent.log_prob(data)
    assert gap.abs().mean() > 0.05


@pytest.mark.parametrize("kind", list(CLASSIC))
def test_classic_flow_integrates_to_one_2d(kind):
    model = random_flow(kind, 2)
    with torch.no_grad():
        data = model.sample(3000)
    assert_nontrivial(model, data)
    est = density_mass(model.log_prob, data)
    assert est.method == "quadrature"
    assert_mass(est, 1.0, max_stderr=1e-3)


@pytest.mark.parametrize("kind, d", [("realnvp", 4), ("maf", 4), ("glow", 6), ("nice", 6)])
def test_classic_flow_integrates_to_one_importance(kind, d):
    model = random_flow(kind, d)
    with torch.no_grad():
        data = model.sample(3000)
    assert_nontrivial(model, data)
    est = density_mass(model.log_prob, data)
    assert est.method == "importance"
    assert_mass(est, 1.0)


def test_a_wrong_log_det_is_detected():
    """The check can fail: a RealNVP density with the log-determinant's sign flipped."""
    model = random_flow("realnvp", 2, noise=0.2)

    def wrong(x: Tensor) -> Tensor:
        z, log_det = model.transform(x)
        return model.latent.log_prob(z) - log_det

    with torch.no_grad():
        data = model.sample(3000)
    est = density_mass(wrong, data)
    assert abs(est.mass - 1) > 10 * est.stderr + 0.05, est


@pytest.mark.parametrize("d", [2, 3])
def test_cnf_integrates_to_one(d):
    torch.manual_seed(0)
    velocity = TimeMLP(d, hidden=16, layers=2, zero_init=False)
    # CNF.from_velocity is the constructor from a velocity network (CNF(velocity, latent) before)
    build = getattr(CNF, "from_velocity", CNF)
    cnf = build(velocity, StandardNormal(d), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        data = cnf.sample(2000)
    assert_nontrivial(cnf, data)
    est = density_mass(cnf.log_prob, data, evaluations=101**2 if d == 2 else 2000)
    assert_mass(est, 1.0, max_stderr=1e-3 if d == 2 else 0.05)


def test_effective_sample_size_flags_a_proposal_that_misses_the_density():
    """A proposal that covers the density gives an ESS near the number of draws; a density far
    narrower than the proposal (in 16 dimensions) gives a tiny ESS, whatever its stderr says."""
    d = 16
    data = torch.randn(2000, d)
    good = density_mass(lambda x: -0.5 * (x**2).sum(-1) - 0.5 * d * math.log(2 * math.pi), data)
    assert good.ess is not None and good.ess > 0.1 * good.n
    narrow = torch.distributions.MultivariateNormal(torch.zeros(d), 0.01 * torch.eye(d))
    bad = density_mass(narrow.log_prob, data)
    assert bad.ess is not None and bad.ess < 0.01 * bad.n
    combined = combine_masses([good, bad])
    assert combined.ess == pytest.approx(good.ess + bad.ess)
    quad = density_mass(lambda x: -0.5 * (x**2).sum(-1) - math.log(2 * math.pi), torch.randn(500, 2))
    assert quad.ess is None and combine_masses([quad, good]).ess is None
