"""Tests of the test metrics (freeflows.eval.metrics.evaluate_model): normalised NLL with unsolved
rows counted, the density mass of every model (and of the free-form paper variant), KL to the
truth, and the Boltzmann ESS from ``sample_and_log_prob``.

Statistical checks allow 4 standard errors (a false alarm rate of about 6e-5 per check).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import freeflows as ff
from freeflows.contract import NumericalError
from freeflows.data.base import DataSet, Split
from freeflows.data.toy import load_toy
from freeflows.eval.metrics import evaluate_model, particle_metrics, takes_variant
from freeflows.standardized import StandardizedModel
from freeflows.transforms.standardize import Standardizer

K = 4.0
FLOOR = 1e-6  # float32 rounding of the evaluated densities


@pytest.fixture(autouse=True)
def _seed_and_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def perturbed(model: nn.Module, noise: float = 0.1) -> nn.Module:
    """``model`` with every parameter moved by ``noise`` (so no network is the identity)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


def free_form(d: int, condition_dim: int | None = None) -> ff.FreeFormFlow:
    """A small free-form flow whose decoder is not the encoder's inverse."""
    k = condition_dim or 0
    return perturbed(
        ff.FreeFormFlow(
            ff.ResNet(d, hidden=16, condition_dim=k),
            ff.ResNet(d, hidden=16, condition_dim=k),
            ff.StandardNormal(d),
            condition_dim=condition_dim,
        )
    )


def assert_one(metrics: dict, key: str = "density_mass") -> None:
    assert abs(metrics[key] - 1) <= K * metrics[f"{key}_stderr"] + FLOOR, metrics


@pytest.fixture(scope="module")
def eight() -> DataSet:
    return load_toy("eight-gaussians", n_train=10, n_val=10, n_test=400)


def test_classic_flow_metrics(eight):
    model = perturbed(ff.RealNVP(2, hidden=16))
    m = evaluate_model(model, eight)
    assert m["test_nll_unsolved"] == 0 and math.isfinite(m["test_nll"])
    assert m["density_mass_method"] == "quadrature" and m["density_mass_evaluations"] == 201**2
    assert m["density_mass_unsolved"] == 0
    assert_one(m)
    with torch.no_grad():
        log_q = model.log_prob(eight.test.x).double()
    assert m["kl_to_truth"] == pytest.approx(float((eight.true_log_prob(eight.test.x) - log_q).mean()))
    assert not any("paper" in k or "encoder" in k for k in m)
    small = evaluate_model(model, eight, mass_samples=2500)
    assert small["density_mass_evaluations"] == 49**2
    assert "density_mass" not in evaluate_model(model, eight, mass_samples=0)


def test_free_form_metrics(eight):
    """The model's own density integrates to one; the paper value does not, and its normalised
    NLL and KL add log(mass)."""
    model = free_form(2)
    m = evaluate_model(model, eight)
    assert_one(m)
    assert abs(m["density_mass_paper"] - 1) > 10 * m["density_mass_paper_stderr"] + 0.01
    for key in ("test_nll_encoder", "test_nll_paper", "kl_to_truth_paper"):
        assert math.isfinite(m[key]) and m[f"{key}_stderr"] > 0
    log_m = math.log(m["density_mass_paper"])
    assert m["test_nll_paper_normalised"] == pytest.approx(m["test_nll_paper"] + log_m)
    assert m["kl_to_truth_paper_normalised"] == pytest.approx(m["kl_to_truth_paper"] + log_m)
    assert m["test_nll_paper_normalised_stderr"] >= m["test_nll_paper_stderr"]
    with torch.no_grad():
        paper = model.log_prob(eight.test.x, variant="paper").double()
    assert m["test_nll_paper"] == pytest.approx(-float(paper.mean()))
    assert "test_log_prob_gap" in m and "test_reconstruction" in m


class HalfSolved(nn.Module):
    """A standard normal whose log_prob is NaN where x_0 > 1, as an unconverged solve gives."""

    def __init__(self) -> None:
        super().__init__()
        self.latent = ff.StandardNormal(2)

    def log_prob(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        lp = self.latent.log_prob(x)
        return torch.where(x[:, 0] > 1, torch.full_like(lp, math.nan), lp)

    def sample(self, n: int, c: Tensor | None = None) -> Tensor:
        return self.latent.sample(n)


def test_unsolved_rows_are_left_out_and_counted():
    x = torch.randn(500, 2)
    data = DataSet("normal", Split(x), Split(x), Split(x), (2,))
    m = evaluate_model(HalfSolved(), data)
    solved = x[:, 0] <= 1
    assert m["test_nll_unsolved"] == int((~solved).sum()) > 0
    assert m["test_nll"] == pytest.approx(float(-ff.StandardNormal(2).log_prob(x[solved]).mean()))
    assert m["density_mass_unsolved"] > 0
    tail = 0.5 * math.erfc(1 / math.sqrt(2))  # the mass the NaN rows hold
    assert abs(m["density_mass"] - (1 - tail)) <= K * m["density_mass_stderr"] + FLOOR


def conditional_data(d: int, n: int = 300) -> DataSet:
    c = torch.randn(n, 1) * 2
    x = torch.cat([c + 0.1 * torch.randn(n, 1), 0.3 * torch.randn(n, d - 1)], dim=1)
    split = Split(x, c)
    return DataSet("conditional", split, split, split, (d,), condition_dim=1)


@pytest.mark.parametrize("d", [2, 4])
def test_conditional_mass(d):
    data = conditional_data(d)
    for model in (perturbed(ff.RealNVP(d, condition_dim=1, hidden=16)), free_form(d, condition_dim=1)):
        m = evaluate_model(model, data)
        assert m["density_mass_conditions"] == 4
        assert m["density_mass_method"] == ("quadrature" if d == 2 else "importance")
        assert_one(m)


def test_variant_detection_sees_through_wrappers():
    x = Split(torch.randn(3, 2))
    unit = Standardizer(torch.zeros(2), torch.ones(2) * 2)
    assert takes_variant(free_form(2), x)
    assert takes_variant(StandardizedModel(free_form(2), unit), x)
    assert not takes_variant(ff.RealNVP(2), x)
    assert not takes_variant(StandardizedModel(ff.RealNVP(2), unit), x)


class ExactDraws(nn.Module):
    """Draws from N(0, I) with their exact density, and a ``log_prob`` that is wrong (constant):
    the ESS must come from the density of the draws."""

    def sample_and_log_prob(self, n: int, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, 4)
        return x, ff.StandardNormal(4).log_prob(x)

    def sample(self, n: int, c: Tensor | None = None) -> Tensor:
        return self.sample_and_log_prob(n, c)[0]

    def log_prob(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        return torch.zeros(x.shape[0])


def test_ess_uses_the_density_of_the_draws():
    """Target exp(-|x|^2/2) and exact draws from it: every weight is equal, ESS = 1."""
    test = Split(torch.randn(10, 4))
    data = DataSet("gauss", test, test, test, (4,), kind="particles")
    data.meta["energy"] = lambda x: 0.5 * x.square().sum(dim=1)
    out = particle_metrics(ExactDraws(), data, n_samples=300, batch_size=100)
    assert out["ess"] == pytest.approx(1.0) and out["ess_dropped"] == 0


class FailsFarOut(HalfSolved):
    """A standard normal whose density cannot be computed (NumericalError) for a batch with a point
    beyond radius 3, as a failed ODE solve does."""

    def log_prob(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        if bool((x.norm(dim=1) > 3).any()):
            raise NumericalError("solve failed")
        return self.latent.log_prob(x)


def test_failed_solves_in_the_mass_are_unsolved_points():
    x = torch.randn(500, 2) * 0.5
    data = DataSet("normal", Split(x), Split(x), Split(x), (2,))
    m = evaluate_model(FailsFarOut(), data)
    assert 0 < m["density_mass_unsolved"] < m["density_mass_evaluations"]
    # beyond radius 3 lies 1.1 % of the mass; the pieces that straddle the circle lose a little more
    assert 0.95 < m["density_mass"] < 1
