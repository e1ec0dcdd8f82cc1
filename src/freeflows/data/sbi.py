r"""Simulation-based inference tasks from sbibm, as conditional data sets.

A task has a prior :math:`p(\theta)` and a simulator :math:`x \sim p(x \mid \theta)`. With a
simulation budget :math:`N`, we draw :math:`\theta_i \sim p(\theta)`, :math:`x_i \sim p(x \mid
\theta_i)` and learn the posterior :math:`q(\theta \mid x) \approx p(\theta \mid x)` from the pairs.

The returned :class:`~freeflows.data.base.DataSet` models :math:`\theta` *given* :math:`x`:
``split.x`` is the standardised parameter :math:`\tilde\theta = (\theta - \mu_\theta)/\sigma_\theta`
(event shape ``(dim_theta,)``) and ``split.c`` the standardised observation
:math:`\tilde x = (x - \mu_x)/\sigma_x` (``condition_dim = dim_x``), both with training-split
statistics. A model of :math:`\tilde\theta` gives densities of :math:`\theta` by the change of
variables (see :func:`posterior_log_prob`):

.. math:: \log q(\theta \mid x) = \log \tilde q(\tilde\theta \mid \tilde x)
   - \textstyle\sum_j \log \sigma_{\theta, j} .

With ``unbounded=True``, :math:`\theta` is first mapped onto :math:`\mathbb{R}^D` by the bijection
:math:`T` of its prior's support (:func:`support_map`: a logit for box priors, a log for
log-normal ones), and :math:`\tilde\theta` standardises :math:`T(\theta)`; the density gains
:math:`\log\lvert\det J_T(\theta)\rvert`, and every draw lands inside the support.

sbibm is imported only inside the functions here; install it with ``pip install -e .[sbi]``
(the working pins are in ``requirements-sbi.txt``). Its wheel ships each task's 10 observations
and 10,000 reference posterior samples per observation, so nothing is downloaded.

sbibm simulates ``sir`` and ``lotka_volterra`` with Julia; for these two, :func:`simulate` draws
:math:`\theta` from sbibm's prior as for every task, and :math:`x` from the scipy simulators of
:mod:`freeflows.data.sbi_ode` (same ODE, initial state, times and noise model). Their
observations, reference posteriors and prior still come from sbibm.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..transforms.standardize import Standardizer
from ..transforms.support import BoxLogit, PositiveLog
from .base import DataSet, split_by_seed
from .sbi_ode import ODE_SIMULATORS

#: The sbibm tasks that simulate offline: sbibm's own simulators, and for sir and lotka_volterra
#: (which sbibm simulates with Julia) the scipy ones of :mod:`freeflows.data.sbi_ode`.
TASKS: tuple[str, ...] = (
    "gaussian_linear",
    "gaussian_linear_uniform",
    "gaussian_mixture",
    "two_moons",
    "slcp",
    "slcp_distractors",
    "bernoulli_glm",
    "bernoulli_glm_raw",
    "sir",
    "lotka_volterra",
)

#: sbibm ships observations and reference posteriors numbered 1 to 10.
NUM_OBSERVATIONS = 10


def check_task(task: str) -> str:
    """Return ``task`` if it is one of :data:`TASKS`, else raise a ``ValueError`` naming them."""
    if task not in TASKS:
        raise ValueError(f"unknown sbi task {task!r}; choose one of: {', '.join(TASKS)}")
    return task


def _check_observation(num_observation: int) -> int:
    if isinstance(num_observation, bool) or not isinstance(num_observation, int):
        raise ValueError(
            f"num_observation must be an integer in 1..{NUM_OBSERVATIONS}, got {num_observation!r}"
        )
    if not 1 <= num_observation <= NUM_OBSERVATIONS:
        raise ValueError(f"num_observation must be in 1..{NUM_OBSERVATIONS}, got {num_observation}")
    return num_observation


@contextlib.contextmanager
def _trusted_task_files() -> Iterator[None]:
    """Let ``torch.load`` read the pickled tensors inside sbibm's own wheel.

    Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``, which rejects the files of
    slcp_distractors and bernoulli_glm. sbibm calls ``torch.load`` itself, so we lift the default
    through ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` for the duration of the call, and restore it.
    """
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weights_only.*")
            yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def get_task(task: str) -> Any:
    """The sbibm task object of ``task`` (imports sbibm lazily)."""
    check_task(task)
    try:
        import sbibm
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "freeflows.data.sbi needs sbibm; install it with `pip install -e .[sbi]` "
            "(pins in requirements-sbi.txt)"
        ) from error
    with _trusted_task_files(), warnings.catch_warnings():
        # sir and lotka_volterra import diffeqtorch, which warns that it finds no Julia image; we
        # never call their Julia simulators (see simulate).
        warnings.filterwarnings("ignore", message=".*JULIA_SYSIMAGE_DIFFEQTORCH.*")
        return sbibm.get_task(task)


def simulate(task: str, num_simulations: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    r"""Draw ``num_simulations`` pairs :math:`\theta \sim p(\theta)`, :math:`x \sim p(x\mid\theta)`.

    sbibm samples from torch's and numpy's global generators; both are seeded with ``seed``
    inside a forked state, so the caller's generators are left as they were. For ``sir`` and
    ``lotka_volterra``, :math:`\theta` comes from sbibm's prior in the same way and :math:`x` from
    the scipy simulator of :mod:`freeflows.data.sbi_ode` with ``numpy.random.default_rng(seed)``
    (it raises :class:`~freeflows.data.sbi_ode.SimulationError` if the ODE solver fails). Returns
    float32 ``theta [N, dim_theta]`` and ``x [N, dim_x]``; raises if the simulator gives non-finite
    values.
    """
    if isinstance(num_simulations, bool) or not isinstance(num_simulations, int) or num_simulations < 1:
        raise ValueError(f"the simulation budget must be a positive integer, got {num_simulations!r}")
    sbibm_task = get_task(task)
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), _trusted_task_files():
            torch.manual_seed(seed)
            np.random.seed(seed)
            theta = sbibm_task.get_prior()(num_samples=num_simulations)
            x = None if task in ODE_SIMULATORS else sbibm_task.get_simulator()(theta)
    finally:
        np.random.set_state(numpy_state)
    if x is None:
        x = ODE_SIMULATORS[task](theta, np.random.default_rng(seed))
    theta, x = theta.float(), x.float()
    if not (torch.isfinite(theta).all() and torch.isfinite(x).all()):
        raise RuntimeError(f"the {task} simulator returned non-finite values with seed {seed}")
    return theta, x


def observation(task: str, num_observation: int) -> Tensor:
    """The observed data ``x_o [dim_x]`` number ``num_observation`` (1..10) of ``task``."""
    _check_observation(num_observation)
    sbibm_task = get_task(task)
    with _trusted_task_files():
        return sbibm_task.get_observation(num_observation=num_observation).float().reshape(-1)


def reference_posterior(task: str, num_observation: int) -> Tensor:
    r"""The 10,000 reference samples :math:`\theta \sim p(\theta \mid x_o)` ``[10000, dim_theta]``."""
    _check_observation(num_observation)
    sbibm_task = get_task(task)
    with _trusted_task_files():
        return sbibm_task.get_reference_posterior_samples(num_observation=num_observation).float()


def support_map(task: str) -> BoxLogit | PositiveLog | None:
    r"""The bijection of ``task``'s prior support onto :math:`\mathbb{R}^D`, or ``None`` if it is
    :math:`\mathbb{R}^D` already.

    A uniform prior on a box gets :class:`~freeflows.transforms.support.BoxLogit`, a log-normal one
    :class:`~freeflows.transforms.support.PositiveLog`; Gaussian priors need none.
    """
    prior = get_task(check_task(task)).get_prior_dist()
    base = getattr(prior, "base_dist", prior)
    if isinstance(base, torch.distributions.Uniform):
        return BoxLogit(base.low.reshape(-1).float(), base.high.reshape(-1).float())
    if isinstance(base, torch.distributions.LogNormal):
        return PositiveLog(int(prior.event_shape[0]))
    if isinstance(base, torch.distributions.MultivariateNormal):
        return None
    raise NotImplementedError(f"no support map for the prior of {task} ({type(base).__name__})")


def load_sbi_task(
    task: str,
    budget: int,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.05,
    unbounded: bool = False,
) -> DataSet:
    r"""A conditional data set of ``budget`` simulations of ``task``, split and standardised.

    The ``budget`` simulations (seeded by ``seed``) are shuffled with ``seed`` and cut into
    validation (``val_fraction``), test (``test_fraction``) and training splits (the rest). Both
    :math:`\theta` and :math:`x` are z-scored with training statistics.

    ``meta`` holds ``task``, ``budget``, ``seed``, ``dim_theta``, ``dim_x``, and the two
    :class:`Standardizer` objects ``theta_standardizer`` and ``x_standardizer``, to map model
    samples back (``inverse``) and new observations in (``forward``), and ``theta_support_map``:
    with ``unbounded=True`` the task's :func:`support_map` (applied before the standardisation, so
    a model sample :math:`\tilde\theta` maps back to ``support.inverse(theta_std.inverse(...))``),
    otherwise ``None``.
    """
    check_task(task)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    if not isinstance(unbounded, bool):
        raise ValueError(f"unbounded must be true or false, got {unbounded!r}")
    theta, x = simulate(task, budget, seed)
    support = support_map(task) if unbounded else None
    if support is not None:
        theta = support(theta)[0]
    train, val, test = split_by_seed(theta, x, (val_fraction, test_fraction), seed)
    if len(train) < 2:
        raise ValueError(f"a budget of {budget} leaves {len(train)} training simulations; need at least 2")
    theta_std = Standardizer.fit(train.x)
    x_std = Standardizer.fit(train.c)
    for split in (train, val, test):
        split.x = theta_std(split.x)[0]
        split.c = x_std(split.c)[0]
    return DataSet(
        name=f"sbi-{task}",
        train=train,
        val=val,
        test=test,
        event_shape=(theta.shape[1],),
        condition_dim=x.shape[1],
        kind="vector",
        meta={
            "task": task,
            "budget": budget,
            "seed": seed,
            "dim_theta": theta.shape[1],
            "dim_x": x.shape[1],
            "theta_standardizer": theta_std,
            "x_standardizer": x_std,
            "theta_support_map": support,
        },
    )


def posterior_log_prob(
    log_prob_standardised: Tensor,
    theta_standardizer: Standardizer,
    theta: Tensor | None = None,
    support: BoxLogit | PositiveLog | None = None,
) -> Tensor:
    r""":math:`\log q(\theta \mid x)` from a model's :math:`\log \tilde q(\tilde\theta \mid \tilde x)`.

    Adds the log-Jacobian of :math:`\theta \mapsto \tilde\theta`: :math:`-\sum_j
    \log\sigma_{\theta,j}`, plus :math:`\log\lvert\det J_T(\theta)\rvert` when the data set was
    made with ``unbounded=True`` (pass its ``theta_support_map`` as ``support`` and the original
    ``theta``, shape ``[N, D]``). Standardising the condition :math:`x` changes no density of
    :math:`\theta`.
    """
    out = log_prob_standardised + theta_standardizer.log_abs_det().to(log_prob_standardised)
    if support is not None:
        if theta is None:
            raise ValueError("posterior_log_prob needs theta when a support map is given")
        out = out + support.log_abs_det(theta).to(out)
    return out
