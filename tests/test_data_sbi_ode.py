"""The scipy simulators of sbibm's sir and lotka_volterra (freeflows.data.sbi_ode).

The main check is against sbibm's shipped data: each of the 10 observations of a task was simulated
by sbibm (with Julia) at its true parameters, so it must be a plausible draw of our noise model
around our noise-free solution at those parameters, and clearly less plausible at other ones.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from freeflows.data import sbi_ode
from freeflows.data.sbi_ode import (
    LV_NOISE_STD,
    SIR_TOTAL_COUNT,
    SimulationError,
    lotka_volterra_log_populations,
    simulate_lotka_volterra,
    simulate_sir,
    sir_infected_fraction,
)
from sbi_cases import tiny_fff_sbi_run

pytestmark = pytest.mark.usefixtures("one_thread")

OBSERVATIONS = range(1, 11)


def _sbibm_data(task: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(true parameters, observation) of sbibm's 10 observations, as float64 arrays."""
    pytest.importorskip("sbibm")
    from freeflows.data.sbi import get_task

    sbibm_task = get_task(task)
    return [
        (
            sbibm_task.get_true_parameters(num_observation=k).double().numpy().reshape(1, -1),
            sbibm_task.get_observation(num_observation=k).double().numpy().reshape(-1),
        )
        for k in OBSERVATIONS
    ]


# -- against sbibm's observations ---------------------------------------------------------------------
def _binomial_log_likelihood(counts: np.ndarray, p: np.ndarray) -> np.ndarray:
    from scipy.stats import binom

    return binom.logpmf(counts, SIR_TOTAL_COUNT, p).sum(axis=-1)


def test_sir_observations_are_binomial_draws_around_our_solution():
    """Per observation: Gaussian-regime standardised residuals are bounded, no count is in an exact
    two-sided Binomial tail below 1e-4, and moving β or γ by ×1.5 costs many nats. Pooled over the
    10 observations, the log-likelihood is inside the range of fresh draws of our noise model."""
    pytest.importorskip("scipy")
    from scipy.stats import binom

    data = _sbibm_data("sir")
    n = SIR_TOTAL_COUNT
    g = np.random.default_rng(0)
    worst_z, worst_tail, gaps = 0.0, 1.0, []
    total_ll, fresh_ll = 0.0, np.zeros(4000)
    for k, (theta, x_o) in zip(OBSERVATIONS, data, strict=True):
        p = sir_infected_fraction(theta)[0]
        var = n * p * (1 - p)
        gaussian = var >= 5.0  # where the normal approximation of the Binomial holds
        z = (x_o - n * p)[gaussian] / np.sqrt(var[gaussian])
        assert gaussian.sum() >= 2, (k, n * p)
        assert np.abs(z).max() < 4.0, (k, z)
        # two-sided exact tail probability of each count, including the tiny-p ones
        tail = 2 * np.minimum(binom.cdf(x_o, n, p), binom.sf(x_o - 1, n, p))
        assert tail.min() > 1e-4, (k, x_o, n * p, tail)
        worst_z, worst_tail = max(worst_z, float(np.abs(z).max())), min(worst_tail, float(tail.min()))

        ll = float(_binomial_log_likelihood(x_o, p))
        total_ll += ll
        fresh_ll += _binomial_log_likelihood(g.binomial(n, p, size=(fresh_ll.size, p.size)), p)
        moved = []
        for j in range(2):
            theta_moved = theta.copy()
            theta_moved[0, j] *= 1.5
            moved.append(ll - float(_binomial_log_likelihood(x_o, sir_infected_fraction(theta_moved)[0])))
        assert min(moved) > 20.0, (k, moved)
        gaps.append(moved)
        print(f"sir obs {k}: log-lik {ll:.2f}, gap to β×1.5 {moved[0]:.1f}, to γ×1.5 {moved[1]:.1f} nats")
    quantile = float((fresh_ll <= total_ll).mean())
    gaps_array = np.array(gaps)
    print(
        f"sir: max |z| {worst_z:.2f}, min two-sided tail {worst_tail:.2g}, pooled log-lik {total_ll:.1f} "
        f"at quantile {quantile:.3f} of {fresh_ll.size} fresh draws; gap β×1.5 "
        f"{gaps_array[:, 0].min():.0f}..{gaps_array[:, 0].max():.0f}, γ×1.5 "
        f"{gaps_array[:, 1].min():.0f}..{gaps_array[:, 1].max():.0f} nats"
    )
    assert quantile > 1e-3, (total_ll, np.quantile(fresh_ll, [0.001, 0.5]))


def test_sir_posterior_of_our_likelihood_is_sbibms_reference_posterior():
    """sbibm's prior times our exact Binomial likelihood, on a 25×25 grid of ±5 reference standard
    deviations, has the mean (within 0.1 SD) and standard deviations (within 10 %) of sbibm's
    10,000 reference samples, for each observation."""
    pytest.importorskip("scipy")
    pytest.importorskip("sbibm")  # the prior and the reference posterior are sbibm's
    from freeflows.data.sbi import get_task, reference_posterior

    prior = get_task("sir").get_prior_dist()
    worst_shift, worst_ratio = 0.0, 0.0
    for k, (_, x_o) in zip(OBSERVATIONS, _sbibm_data("sir"), strict=True):
        reference = reference_posterior("sir", k).double().numpy()
        mean, sd = reference.mean(0), reference.std(0)
        axes = [np.linspace(mean[j] - 5 * sd[j], mean[j] + 5 * sd[j], 25) for j in range(2)]
        grid = np.stack([a.ravel() for a in np.meshgrid(*axes, indexing="ij")], axis=1)
        log_prior = prior.log_prob(torch.from_numpy(grid)).double().numpy()
        log_w = _binomial_log_likelihood(x_o, sir_infected_fraction(grid)) + log_prior
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        grid_mean = w @ grid
        grid_sd = np.sqrt(w @ (grid - grid_mean) ** 2)
        shift, ratio = (grid_mean - mean) / sd, grid_sd / sd
        assert np.abs(shift).max() < 0.1 and np.abs(ratio - 1).max() < 0.1, (k, shift, ratio)
        worst_shift = max(worst_shift, float(np.abs(shift).max()))
        worst_ratio = max(worst_ratio, float(np.abs(np.log(ratio)).max()))
    print(
        f"sir grid posterior vs reference: max |mean shift| {worst_shift:.3f} SD, "
        f"SD ratio within ×{math.exp(worst_ratio):.3f}"
    )


def test_lotka_volterra_observations_are_lognormal_around_our_solution():
    """The 200 log-residuals of the 10 observations are N(0, σ²) with σ = 0.1: their RMS is
    inside the chi-square(200) 0.05 %-99.95 % range, their mean within 3.5 standard errors of 0,
    none beyond 5σ; at α×1.5 the residuals are far larger."""
    pytest.importorskip("scipy")
    from scipy.stats import chi2

    data = _sbibm_data("lotka_volterra")
    residuals, moved = [], []
    for theta, x_o in data:
        residuals.append(np.log(x_o) - lotka_volterra_log_populations(theta)[0])
        theta_moved = theta.copy()
        theta_moved[0, 0] *= 1.5
        moved.append(np.log(x_o) - lotka_volterra_log_populations(theta_moved)[0])
    r = np.concatenate(residuals)
    m = r.size
    assert m == 200
    rms, mean, sd = float(np.sqrt(np.mean(r**2))), float(r.mean()), float(r.std(ddof=1))
    lo, hi = (LV_NOISE_STD * math.sqrt(chi2.ppf(q, m) / m) for q in (5e-4, 1 - 5e-4))
    mean_bound = 3.5 * LV_NOISE_STD / math.sqrt(m)
    moved_rms = float(np.sqrt(np.mean(np.concatenate(moved) ** 2)))
    print(
        f"lotka_volterra: {m} residuals, RMS {rms:.4f} (allowed {lo:.4f}..{hi:.4f}, σ {LV_NOISE_STD}), "
        f"SD {sd:.4f}, mean {mean:+.4f} (allowed ±{mean_bound:.4f}), max |r|/σ "
        f"{np.abs(r).max() / LV_NOISE_STD:.2f}; per observation SD "
        + ", ".join(f"{res.std(ddof=1):.3f}" for res in residuals)
        + f"; RMS at α×1.5: {moved_rms:.3f}"
    )
    assert lo < rms < hi, (rms, lo, hi)
    assert abs(mean) < mean_bound, (mean, mean_bound)
    assert np.abs(r).max() < 5 * LV_NOISE_STD, np.abs(r).max()
    assert moved_rms > 5 * LV_NOISE_STD, moved_rms


def test_lotka_volterra_solution_keeps_its_first_integral():
    r"""The Lotka–Volterra flow conserves :math:`V = \delta u - \gamma \log u + \beta v - \alpha\log v`;
    our solution (log coordinates) keeps it at all 10 times, for 300 prior-like parameters."""
    pytest.importorskip("scipy")
    g = np.random.default_rng(1)
    theta = np.exp(np.array([-0.125, -3.0, -0.125, -3.0]) + 0.5 * g.standard_normal((300, 4)))
    log_pop = lotka_volterra_log_populations(theta)
    a, b = log_pop[:, :10], log_pop[:, 10:]
    unclamped = ((log_pop > math.log(1e-10)) & (log_pop < math.log(1e4))).all(axis=1)
    alpha, beta, gamma, delta = (theta[:, j : j + 1] for j in range(4))
    v = delta * np.exp(a) - gamma * a + beta * np.exp(b) - alpha * b
    drift = np.abs(v - v[:, :1]) / (1 + np.abs(v[:, :1]))
    assert unclamped.sum() > 250
    assert drift[unclamped].max() < 1e-5, drift[unclamped].max()
    # the initial state is exact
    np.testing.assert_allclose(a[:, 0], math.log(30.0))
    np.testing.assert_allclose(b[:, 0], 0.0, atol=1e-12)


def test_simulated_noise_is_sbibms_noise_model():
    """Many simulations at one parameter: SIR counts have the Binomial(1000, p) mean and variance,
    Lotka–Volterra log-data are N(log solution, 0.1²) (sbibm's σ, written out here on purpose)."""
    pytest.importorskip("scipy")
    reps = 2000
    theta_sir = np.tile([[0.61479264, 0.19172086]], (reps, 1))  # sir observation 1's truth
    p = sir_infected_fraction(theta_sir[:1])[0]
    counts = simulate_sir(theta_sir, 0).double().numpy()
    n = SIR_TOTAL_COUNT
    assert (counts == np.round(counts)).all() and counts.min() >= 0 and counts.max() <= n
    se = np.sqrt(n * p * (1 - p) / reps)
    assert (np.abs(counts.mean(0) - n * p) <= 4 * se + 1e-3).all(), (counts.mean(0), n * p)
    wide = n * p * (1 - p) > 5
    np.testing.assert_allclose(counts.var(0)[wide], (n * p * (1 - p))[wide], rtol=0.15)

    theta_lv = np.tile([[0.6859157, 0.10761319, 0.88789904, 0.116794825]], (reps, 1))  # obs 1's truth
    residuals = np.log(simulate_lotka_volterra(theta_lv, 0).double().numpy())
    residuals -= lotka_volterra_log_populations(theta_lv[:1])
    assert abs(residuals.mean()) < 4 * 0.1 / math.sqrt(residuals.size)
    assert residuals.std() == pytest.approx(0.1, rel=0.02)
    np.testing.assert_allclose(residuals.std(0), 0.1, rtol=0.1)


# -- seeds, shapes, errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("simulator, dim", [(simulate_sir, 2), (simulate_lotka_volterra, 4)])
def test_simulators_are_seeded_and_leave_global_generators_alone(simulator, dim):
    pytest.importorskip("scipy")
    theta = torch.exp(torch.tensor([-0.9, -2.1, -0.1, -3.0])[:dim] + 0.3 * torch.randn(50, dim))
    numpy_before, torch_before = np.random.get_state(), torch.random.get_rng_state()
    a, b, c = simulator(theta, 7), simulator(theta, 7), simulator(theta, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(simulator(theta, np.random.default_rng(7)), a)
    # a Generator is advanced: two calls on one generator differ
    g = np.random.default_rng(7)
    assert not torch.equal(simulator(theta, g), simulator(theta, g))
    numpy_after = np.random.get_state()
    assert numpy_before[0] == numpy_after[0] and np.array_equal(numpy_before[1], numpy_after[1])
    assert torch.equal(torch_before, torch.random.get_rng_state())
    with pytest.raises(TypeError, match="Generator"):
        simulator(theta, 1.5)


@pytest.mark.parametrize("task, dim_theta, dim_x", [("sir", 2, 10), ("lotka_volterra", 4, 20)])
def test_simulate_wires_the_ode_tasks_seeded_with_sbibm_shapes(task, dim_theta, dim_x):
    pytest.importorskip("sbibm")
    pytest.importorskip("scipy")
    from freeflows.data.sbi import get_task, observation, simulate

    numpy_before, torch_before = np.random.get_state(), torch.random.get_rng_state()
    theta, x = simulate(task, 3000, seed=0)
    assert theta.shape == (3000, dim_theta) and x.shape == (3000, dim_x)
    assert theta.dtype == x.dtype == torch.float32
    assert torch.isfinite(theta).all() and torch.isfinite(x).all()
    assert (theta > 0).all() and x.shape[1:] == observation(task, 1).shape
    if task == "sir":
        assert (x == x.round()).all() and x.min() >= 0 and x.max() <= SIR_TOTAL_COUNT
        assert (x[:, 0] <= 1).all()  # one infected person in a million at t = 0
        assert x[:, 1:].max() > 100  # outbreaks happen
    else:
        assert (x > 0).all()
    # the prior is sbibm's, seeded as for every task
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        assert torch.equal(get_task(task).get_prior()(num_samples=3000).float(), theta)
    small = [simulate(task, 300, seed=seed) for seed in (5, 5, 6)]
    assert torch.equal(small[0][0], small[1][0]) and torch.equal(small[0][1], small[1][1])
    assert not torch.equal(small[0][0], small[2][0]) and not torch.equal(small[0][1], small[2][1])
    numpy_after = np.random.get_state()
    assert np.array_equal(numpy_before[1], numpy_after[1]) and numpy_before[2] == numpy_after[2]
    assert torch.equal(torch_before, torch.random.get_rng_state())


def test_bad_parameters_and_solver_failures_are_clear_errors():
    pytest.importorskip("scipy")
    with pytest.raises(ValueError, match=r"shape \[n, 2\]"):
        simulate_sir(torch.ones(3, 4), 0)
    with pytest.raises(ValueError, match="finite; row 1"):
        simulate_lotka_volterra(torch.tensor([[1.0, 0.1, 1.0, 0.1], [1.0, float("nan"), 1.0, 0.1]]), 0)
    # a negative recovery rate of 1e6 per day: I(t) grows like exp(1e6 t) and the solver gives up
    with pytest.raises(SimulationError, match=r"sir ODE solver failed at row 1, theta=\[0.5, -1000000.0\]"):
        simulate_sir(torch.tensor([[0.5, 0.1], [0.5, -1e6]], dtype=torch.float64), 0)
    # prey growing at rate 1000: exp of the log population overflows in the right-hand side
    with pytest.raises(SimulationError, match="lotka_volterra ODE solver failed at row 0"):
        simulate_lotka_volterra(torch.tensor([[1000.0, 0.05, 1.0, 0.05]]), 0)


def test_importing_freeflows_and_sbi_ode_imports_no_heavy_package():
    code = (
        "import sys, json, freeflows, freeflows.data.sbi_ode\n"
        "print(json.dumps([m for m in ('scipy', 'sbibm', 'lightning', 'matplotlib') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    assert sbi_ode.ODE_SIMULATORS.keys() == {"sir", "lotka_volterra"}


# -- end to end -------------------------------------------------------------------------------------
def test_sbi_cli_end_to_end_sir(tmp_path, capsys):
    pytest.importorskip("sbibm")
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    out = tmp_path / "run"
    code, result = tiny_fff_sbi_run("sir", out)
    assert code == 0
    assert result["task"] == "sir" and result["budget"] == 300 and result["method"] == "fff"
    assert result["preset"] == "sbi-sir" and result["model"]["fff"]["beta"] == 30.0
    assert [row["observation"] for row in result["observations"]] == [1]
    assert 0.45 <= result["mean_c2st"] <= 1.0
    assert (out / "sbi_c2st.md").is_file() and (out / "pairplot_obs1.png").is_file()
    draws = np.load(out / "posterior_obs1.npy")
    # sir's prior is log-normal: every draw kept is positive and finite
    assert draws.shape == (300, 2) and np.isfinite(draws).all() and draws.min() > 0
    assert "mean C2ST" in capsys.readouterr().out
