r"""Simulators of sbibm's two ODE tasks, ``sir`` and ``lotka_volterra``, with scipy instead of Julia.

sbibm ships the prior, observations and reference posteriors of both tasks, but simulates them
with DifferentialEquations.jl. The functions here solve the same initial-value problems with
:func:`scipy.integrate.odeint` (LSODA) at sbibm's tolerances (relative and absolute ``1e-8``),
read the solution at the same times and add the same noise.

**SIR** (:math:`\theta = (\beta, \gamma)`, population :math:`N = 10^6`):

.. math:: \dot S = -\beta S I / N, \qquad \dot I = \beta S I / N - \gamma I, \qquad
   \dot R = \gamma I, \qquad (S, I, R)(0) = (N - 1,\ 1,\ 0).

:math:`R = N - S - I` never enters the data, so only :math:`(S, I)` is integrated. sbibm saves the
solution daily on :math:`[0, 160]` and keeps every 17th day, :math:`t_k = 17k`,
:math:`k = 0, \dots, 9`. The data are 10 counts

.. math:: x_k \sim \mathrm{Binomial}\bigl(1000,\ p_k\bigr), \qquad
   p_k = \min\bigl(\max(I(t_k)/N, 0), 1\bigr).

**Lotka–Volterra** (:math:`\theta = (\alpha, \beta, \gamma, \delta)`, prey :math:`u`, predators
:math:`v`):

.. math:: \dot u = \alpha u - \beta u v, \qquad \dot v = -\gamma v + \delta u v, \qquad
   (u, v)(0) = (30, 1).

sbibm saves the solution every 0.1 on :math:`[0, 20]` and keeps every 21st point,
:math:`t_k = 2.1k`, :math:`k = 0, \dots, 9`. The data are 20 values, the 10 prey then the 10
predator values, each log-normal around the clamped solution:

.. math:: \log x_k = \log \operatorname{clamp}\bigl(u(t_k), 10^{-10}, 10^4\bigr)
   + \sigma\varepsilon_k, \qquad \varepsilon_k \sim \mathcal N(0, 1), \quad \sigma = 0.1 ,

and likewise for :math:`v`. We integrate the same ODE in log coordinates
:math:`(a, b) = (\log u, \log v)`,

.. math:: \dot a = \alpha - \beta e^{b}, \qquad \dot b = -\gamma + \delta e^{a},

which keeps the relative accuracy where a population collapses. In linear coordinates an absolute
tolerance of ``1e-8`` cannot resolve a population below about ``1e-8``; for a few prior draws in a
thousand the linear-coordinate solution then drifts (or turns negative) and its logarithm differs
from the exact one, while the log-coordinate solution stays within about ``1e-4`` of a solve at
tolerance ``1e-10``. Where both are accurate they agree with each other and with sbibm's
observations (tests/test_data_sbi_ode.py).

**Failures.** A parameter row that is not finite raises ``ValueError``. If LSODA reports a failure
(scipy's ``ODEintWarning``), the right-hand side overflows, or the solution is not finite,
:class:`SimulationError` is raised, naming the task, the row and its parameters; nothing is
silently replaced. (sbibm would return a row of NaN instead.) None of 100,000 prior draws of
either task fails.

Randomness comes only from the ``numpy.random.Generator`` passed in (or one made from an integer
seed); no global generator of numpy or torch is used or changed. scipy is imported inside the
functions, so importing this module does not import it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

#: SIR: total population :math:`N`, initially infected and recovered people.
SIR_POPULATION = 1_000_000.0
SIR_INITIAL_INFECTED = 1.0
SIR_INITIAL_RECOVERED = 0.0
#: SIR: the observation times (days), every 17th point of a daily grid on [0, 160].
SIR_TIMES = 17.0 * np.arange(10)
#: SIR: number of Binomial trials of each count.
SIR_TOTAL_COUNT = 1000

#: Lotka–Volterra: initial prey and predator populations.
LV_INITIAL = (30.0, 1.0)
#: Lotka–Volterra: the observation times, every 21st point of a grid of step 0.1 on [0, 20].
LV_TIMES = 0.1 * 21 * np.arange(10)
#: Lotka–Volterra: standard deviation of the log-normal noise.
LV_NOISE_STD = 0.1
#: Lotka–Volterra: the solution is clamped to this range before taking its logarithm.
LV_CLAMP = (1e-10, 1e4)

#: Relative and absolute tolerance of the solver (sbibm's Tsit5 settings).
RTOL = 1e-8
ATOL = 1e-8

Simulator = Callable[[Tensor, np.random.Generator | int], Tensor]


class SimulationError(RuntimeError):
    """The ODE solver failed, or returned non-finite values, for one parameter row."""


def _parameters(theta: Tensor | np.ndarray, width: int, task: str) -> np.ndarray:
    """``theta`` as a float64 array ``[n, width]`` of finite values, else ``ValueError``."""
    if isinstance(theta, Tensor):
        theta = theta.detach().cpu().double().numpy()
    array = np.asarray(theta, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{task} parameters must have shape [n, {width}], got {tuple(array.shape)}")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{task} parameters must be finite; row {row} is {array[row].tolist()}")
    return array


def _solve(
    rhs: Callable[..., tuple[float, float]],
    y0: Sequence[float],
    times: np.ndarray,
    theta: np.ndarray,
    task: str,
) -> np.ndarray:
    """Solve ``y' = rhs(y, t, *theta[i])`` from ``y0`` for every row; return ``[n, len(times), dim]``."""
    from scipy.integrate import ODEintWarning, odeint  # exported since scipy 1.12 (the [sbi] pin)

    out = np.empty((theta.shape[0], len(times), len(y0)))
    for i, row in enumerate(theta):
        args = tuple(float(p) for p in row)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", ODEintWarning)
                out[i] = odeint(rhs, y0, times, args=args, rtol=RTOL, atol=ATOL)
        except (ODEintWarning, ArithmeticError) as failure:
            reason = str(failure).split(" Run with full_output")[0]  # scipy's hint does not apply
            raise SimulationError(
                f"the {task} ODE solver failed at row {i}, theta={list(args)}: {reason}"
            ) from failure
        if not np.isfinite(out[i]).all():
            raise SimulationError(f"the {task} ODE solution is not finite at row {i}, theta={list(args)}")
    return out


def _rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, bool) or not isinstance(rng, int | np.integer):
        raise TypeError(f"rng must be a numpy.random.Generator or an integer seed, got {rng!r}")
    return np.random.default_rng(int(rng))


# -- SIR --------------------------------------------------------------------------------------------
def _sir_rhs(y: np.ndarray, t: float, beta: float, gamma: float) -> tuple[float, float]:
    """:math:`(\\dot S, \\dot I)` of the SIR model."""
    s, i = y
    infections = beta * s * i / SIR_POPULATION
    return -infections, infections - gamma * i


def sir_infected_fraction(theta: Tensor | np.ndarray) -> np.ndarray:
    r"""The noise-free :math:`p_k = \operatorname{clamp}(I(t_k)/N, 0, 1)` at the 10 times ``[n, 10]``.

    ``theta`` holds rows :math:`(\beta, \gamma)`; the result is float64.
    """
    theta = _parameters(theta, 2, "sir")
    y0 = (SIR_POPULATION - SIR_INITIAL_INFECTED - SIR_INITIAL_RECOVERED, SIR_INITIAL_INFECTED)
    infected = _solve(_sir_rhs, y0, SIR_TIMES, theta, "sir")[:, :, 1]
    return np.clip(infected / SIR_POPULATION, 0.0, 1.0)


def simulate_sir(theta: Tensor | np.ndarray, rng: np.random.Generator | int) -> Tensor:
    r"""SIR data ``[n, 10]`` (float32 counts): :math:`x_k \sim \mathrm{Binomial}(1000, p_k)`."""
    p = sir_infected_fraction(theta)
    counts = _rng(rng).binomial(SIR_TOTAL_COUNT, p)
    return torch.from_numpy(counts.astype(np.float32))


# -- Lotka–Volterra ---------------------------------------------------------------------------------
def _lotka_volterra_log_rhs(
    y: np.ndarray, t: float, alpha: float, beta: float, gamma: float, delta: float
) -> tuple[float, float]:
    """:math:`(\\dot a, \\dot b)` of the Lotka–Volterra model in log populations."""
    log_prey, log_predators = y
    return alpha - beta * math.exp(log_predators), -gamma + delta * math.exp(log_prey)


def lotka_volterra_log_populations(theta: Tensor | np.ndarray) -> np.ndarray:
    r"""The noise-free clamped log populations ``[n, 20]``: 10 prey, then 10 predator values.

    Each is :math:`\log\operatorname{clamp}(u(t_k), 10^{-10}, 10^4)` (resp. :math:`v`) for rows
    :math:`(\alpha, \beta, \gamma, \delta)` of ``theta``; float64.
    """
    theta = _parameters(theta, 4, "lotka_volterra")
    y0 = tuple(math.log(v) for v in LV_INITIAL)
    log_populations = _solve(_lotka_volterra_log_rhs, y0, LV_TIMES, theta, "lotka_volterra")
    lo, hi = (math.log(v) for v in LV_CLAMP)
    return np.clip(log_populations.transpose(0, 2, 1).reshape(theta.shape[0], -1), lo, hi)


def simulate_lotka_volterra(theta: Tensor | np.ndarray, rng: np.random.Generator | int) -> Tensor:
    r"""Lotka–Volterra data ``[n, 20]`` (float32): :math:`\exp(\log\text{population} + 0.1\,\varepsilon)`."""
    mean = lotka_volterra_log_populations(theta)
    noise = _rng(rng).standard_normal(mean.shape)
    return torch.from_numpy(np.exp(mean + LV_NOISE_STD * noise).astype(np.float32))


#: Task name -> simulator ``fn(theta [n, dim_theta], rng) -> x [n, dim_x]``.
ODE_SIMULATORS: dict[str, Simulator] = {
    "sir": simulate_sir,
    "lotka_volterra": simulate_lotka_volterra,
}
