r"""Test metrics of a trained model on a data set (tool layer; torch only).

Everything uses only the model contract (``log_prob``, ``sample``, ``sample_and_log_prob``),
never the model's class. :func:`evaluate_model` returns the dictionary that a run writes to
``metrics.json``:

* ``test_nll``, ``test_nll_stderr``: negative log-likelihood of the test split under
  ``log_prob``, the density of what the model samples. Rows where it is NaN (a free-form flow's
  solve :math:`g(z) = x` that did not converge) are left out and counted in
  ``test_nll_unsolved``.
* ``density_mass``, ``density_mass_stderr``, ``density_mass_method``: :math:`\int q`, the mass
  of ``log_prob`` (1 for a normalised density), by quadrature (≤ 2-D) or importance sampling
  (:func:`freeflows.eval.mass.density_mass`); ``density_mass_unsolved`` of the
  ``density_mass_evaluations`` points had a NaN density and counted as zero;
  ``density_mass_ess``, the importance weights' effective sample size (far below the
  evaluations, the estimate is not reliable). For a conditional model, the mean over
  ``density_mass_conditions`` test conditions.
* For a model whose ``log_prob`` takes ``variant`` (the free-form flow): ``test_nll_encoder``,
  and the free-form paper's value ``test_nll_paper`` (**not normalised**) with its mass
  ``density_mass_paper`` and the normalised ``test_nll_paper_normalised``
  :math:`= \mathrm{NLL} + \log M`, whose error combines both.
* ``kl_to_truth`` (when the data's density is known), and ``kl_to_truth_paper`` /
  ``kl_to_truth_paper_normalised`` for the paper variant.
* For images (``data.kind == "image"`` with ``data.meta["levels"]``): ``test_bits_per_dim`` from
  ``test_nll`` (:mod:`freeflows.eval.bits`), and ``test_bits_per_dim_paper`` (**not
  normalised**) for the free-form flow.
* For particle systems (``data.kind == "particles"``, with ``data.meta["energy"]``) the model
  is also judged as a Boltzmann generator (:func:`particle_metrics`): the effective sample size
  of importance weights :math:`\exp(-E(x) - \log q(x))` of the model's own draws, with
  :math:`\log q` the density of the distribution that drew them (``sample_and_log_prob``), and
  their energies against the data's.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..contract import NumericalError
from ..data.base import DataSet, Split
from .mass import DEFAULT_DRAWS, DEFAULT_NODES, MassEstimate, combine_masses, density_mass

#: For particle data, rows per ``log_prob`` batch times the event size is at most this.
PARTICLE_ELEMENTS = 4096

#: Test conditions at which a conditional model's mass is estimated, and model draws per
#: condition that place the quadrature box or fit the importance proposal.
MASS_CONDITIONS = 4
MASS_FIT_DRAWS = 1000
#: A mass batch whose solve fails is halved down to pieces of this many points, which get NaN.
FAILED_PIECE = 16


def batched_log_prob(model: nn.Module, split: Split, batch_size: int = 1000, **kwargs: Any) -> torch.Tensor:
    """``log_prob`` of every row of a split, in batches, under ``torch.no_grad`` (as in
    validation): no graph back to the parameters is kept, which for a CNF with the exact trace is
    the difference between megabytes and gigabytes. Keywords (e.g. ``variant``) go to
    ``log_prob``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(split), batch_size):
            x = split.x[i : i + batch_size]
            c = None if split.c is None else split.c[i : i + batch_size]
            out.append(model.log_prob(x, c, **kwargs).detach())
    return torch.cat(out)


def takes_variant(model: nn.Module, split: Split) -> bool:
    """Whether ``model.log_prob`` takes ``variant`` (the free-form flow's density variants): named
    in its signature, or accepted through ``**kwargs`` by a wrapper (tried on one row)."""
    try:
        params = inspect.signature(model.log_prob).parameters
    except (TypeError, ValueError):
        return False
    if "variant" in params:
        return True
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return False
    try:
        batched_log_prob(model, Split(split.x[:1], None if split.c is None else split.c[:1]), variant="paper")
    except TypeError:
        return False
    return True


def nll_summary(log_q: Tensor) -> tuple[float, float, int]:
    r"""Mean and standard error of :math:`-\log q` over the rows that are not NaN, and how many
    are NaN (unsolved)."""
    solved = ~torch.isnan(log_q)
    kept = log_q[solved].double()
    if kept.numel() == 0:
        return math.nan, math.nan, int(log_q.numel())
    stderr = float(kept.std() / kept.numel() ** 0.5) if kept.numel() > 1 else math.nan
    return float(-kept.mean()), stderr, int((~solved).sum())


def _mass_budget(evaluations: int | None, dim: int, conditions: int) -> int:
    """``log_prob`` evaluations per condition: the total (``None``: the method's default) split
    evenly over the conditions."""
    if evaluations is None:
        evaluations = DEFAULT_NODES[dim] ** dim if dim <= 2 else DEFAULT_DRAWS
    return max(evaluations // conditions, 9 if dim <= 2 else 2)


def model_density_mass(
    model: nn.Module,
    test: Split,
    *,
    variant: str | None = None,
    evaluations: int | None = None,
    conditions: int = MASS_CONDITIONS,
    batch_size: int = 1000,
    seed: int = 0,
) -> MassEstimate:
    r""":func:`~freeflows.eval.mass.density_mass` of ``model.log_prob`` (of its ``variant`` if
    given), in the latent's subspace when the latent has a ``basis``.

    Unconditional: the box or proposal covers the test split. Conditional: the mean over the
    first ``conditions`` test conditions :math:`c_j` of the mass of :math:`q(\cdot \mid c_j)`,
    each with a box or proposal placed by ``MASS_FIT_DRAWS`` model draws at :math:`c_j` (the
    test split's :math:`x` are draws from other conditions), the importance proposal mixed with a
    Gaussian fitted to the test split. ``evaluations`` is the total budget (``None``: 201 × 201
    nodes in 2-D, 2001 in 1-D, 4000 draws above), split over the conditions. Points whose
    density could not be computed (NaN, or a :class:`~freeflows.contract.NumericalError` such as
    a failed ODE solve) count as zero and in ``unsolved``; warnings of unconverged solves are
    silenced.
    """
    kwargs = {} if variant is None else {"variant": variant}

    def tolerant(x: Tensor, c: Tensor | None = None) -> Tensor:
        """``log_prob``; a batch whose solve fails (:class:`NumericalError`) is halved until
        the failing points, in pieces of at most ``FAILED_PIECE``, are found; those get NaN."""
        try:
            return model.log_prob(x, c, **kwargs)
        except NumericalError:
            if x.shape[0] <= FAILED_PIECE:
                return torch.full((x.shape[0],), math.nan, dtype=x.dtype, device=x.device)
            h = x.shape[0] // 2
            halves = (None, None) if c is None else (c[:h], c[h:])
            return torch.cat([tolerant(x[:h], halves[0]), tolerant(x[h:], halves[1])])

    basis = getattr(getattr(model, "latent", None), "basis", None)
    dim = basis.shape[1] if basis is not None else int(test.x[0].numel())
    options = {"basis": basis, "batch_size": batch_size}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if test.c is None:
            budget = _mass_budget(evaluations, dim, 1)
            return density_mass(tolerant, test.x, evaluations=budget, seed=seed, **options)
        estimates = []
        k = min(conditions, len(test))
        for j in range(k):
            c = test.c[j]
            with torch.no_grad(), _seeded(seed + j):
                draws = model.sample(MASS_FIT_DRAWS, c)
            finite = draws.reshape(draws.shape[0], -1).isfinite().all(dim=1)
            fit = draws[finite] if int(finite.sum()) >= 2 else test.x

            def log_prob(x: Tensor, c: Tensor = c) -> Tensor:
                return tolerant(x, c.expand(x.shape[0], *c.shape))

            budget = _mass_budget(evaluations, dim, k)
            estimates.append(
                density_mass(log_prob, fit, evaluations=budget, extra=test.x, seed=seed + j, **options)
            )
        return combine_masses(estimates)


class _seeded:
    """Seed the global RNG for a block and restore its state afterwards (``sample`` draws from
    the global generator in the model contract)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.random.set_rng_state(self.state)


def sampling_seconds_per_sample(
    model: nn.Module, n: int, c: torch.Tensor | None = None, repeats: int = 3
) -> float:
    """Median wall time of ``model.sample(n)`` divided by ``n``."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model.sample(n, c)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] / n


def density_dimension(model: nn.Module, event_shape: tuple[int, ...] | torch.Size) -> int:
    """Degrees of freedom of the space in which ``log_prob`` is a density: the latent's ``dim``
    (e.g. :math:`(N-1)d` for a mean-free latent), else the number of elements of an event."""
    dim = getattr(getattr(model, "latent", None), "dim", None)
    if isinstance(dim, int):
        return dim
    return int(torch.Size(event_shape).numel())


def nll_dimensions(model: nn.Module, data: DataSet) -> int:
    """:func:`density_dimension` of ``data``'s events."""
    return density_dimension(model, data.event_shape)


def particle_metrics(
    model: nn.Module, data: DataSet, n_samples: int = 2000, batch_size: int = 1000, seed: int = 0
) -> dict[str, Any]:
    r"""Boltzmann-generator metrics of ``n_samples`` model draws (``data.meta["energy"]`` is the
    target energy :math:`E` at temperature 1):

    * ``ess``: normalised effective sample size :math:`(\sum w)^2 / (n \sum w^2) \in [1/n, 1]` of
      :math:`\log w = -E(x) - \log q(x)`, with :math:`\log q` from ``sample_and_log_prob``: the
      exact density of the distribution that drew each sample (for a free-form decoder draw
      :math:`x = g(z)`, the density at the drawn :math:`z`, not ``log_prob(x)``). Samples whose
      log-weight is NaN or :math:`+\infty` (non-finite sample, energy or density) are dropped and
      counted in ``ess_dropped``; an infinite energy is a zero weight and is kept. ``ess`` is
      ``None`` when no weight is usable.
    * ``sample_energy_mean`` / ``_median`` over the finite sample energies (``sample_energy_nonfinite``
      counts the others; LJ energies of overlapping particles overflow), and ``data_energy_mean`` /
      ``_median`` of the test split; ``ess_samples``, the number of draws.
    """
    from .particles import effective_sample_size, log_importance_weights

    energy = data.meta["energy"]
    samples, log_qs = [], []
    with torch.no_grad(), _seeded(seed):
        for i in range(0, n_samples, batch_size):
            x, log_q = model.sample_and_log_prob(min(batch_size, n_samples - i))
            samples.append(x.detach())
            log_qs.append(log_q.detach())
    samples, log_q = torch.cat(samples), torch.cat(log_qs)
    with torch.no_grad():
        e_model = energy(samples.double())
        e_data = energy(data.test.x.double())
    log_w = log_importance_weights(e_model, log_q.double())
    usable = ~(torch.isnan(log_w) | torch.isposinf(log_w))
    out: dict[str, Any] = {"ess_samples": n_samples, "ess_dropped": int((~usable).sum())}
    kept = log_w[usable]
    if kept.numel() == 0 or torch.isneginf(kept).all():
        out["ess"] = None
    else:
        out["ess"] = float(effective_sample_size(kept))
    finite = e_model[torch.isfinite(e_model)]
    out["sample_energy_nonfinite"] = int(e_model.numel() - finite.numel())
    out["sample_energy_mean"] = float(finite.mean()) if finite.numel() else None
    out["sample_energy_median"] = float(finite.median()) if finite.numel() else None
    out["data_energy_mean"] = float(e_data.mean())
    out["data_energy_median"] = float(e_data.median())
    return out


def _mass_metrics(estimate: MassEstimate, suffix: str = "") -> dict[str, Any]:
    key = f"density_mass{suffix}"
    return {
        key: estimate.mass,
        f"{key}_stderr": estimate.stderr,
        f"{key}_method": estimate.method,
        f"{key}_evaluations": estimate.n,
        f"{key}_unsolved": estimate.unsolved,
        **({} if estimate.ess is None else {f"{key}_ess": estimate.ess}),
    }


def evaluate_model(
    model: nn.Module,
    data: DataSet,
    batch_size: int = 1000,
    particle_samples: int = 2000,
    test_rows: int | None = None,
    mass_samples: int | None = None,
    mass_conditions: int = MASS_CONDITIONS,
) -> dict[str, Any]:
    """Test NLL, density mass, diagnostics, KL to the truth when the density is known, parameter
    count and sampling time; for particle data also :func:`particle_metrics` on
    ``particle_samples`` draws (the keys are listed in the module docstring). ``nll_dims`` is the
    dimension of the space in which the NLL is a density (for a mean-free latent, the
    :math:`(N-1)d`-dimensional zero-centre-of-mass subspace).

    Args:
        model: any density model of the contract.
        data: the data set; its test split is evaluated.
        batch_size: rows per ``log_prob`` call (for particle data at most
            ``PARTICLE_ELEMENTS // D``).
        particle_samples: draws for :func:`particle_metrics` (0: none).
        test_rows: evaluate only the first rows of the test split (``n_test`` says how many).
        mass_samples: ``log_prob`` evaluations per mass estimate (:func:`model_density_mass`);
            ``None``: 201 × 201 nodes in 2-D, 2001 in 1-D, 4000 importance draws above; 0: no mass.
        mass_conditions: test conditions averaged over for a conditional model's mass.
    """
    model.eval()
    molecules = data.kind == "molecules"
    if molecules:  # an exact density costs Jacobians of N*(d+k) columns: a few rows, no mass
        test_rows = data.meta["nll_rows"] if test_rows is None else test_rows
        mass_samples, batch_size = 0, min(batch_size, 8)
    if data.kind == "particles":
        # Exact densities of equivariant nets hold [rows * D, N, N, hidden] tensors: bound memory.
        batch_size = min(batch_size, max(1, PARTICLE_ELEMENTS // int(torch.Size(data.event_shape).numel())))
    test = data.test
    if test_rows is not None and test_rows < len(test):
        test = Split(test.x[:test_rows], None if test.c is None else test.c[:test_rows])
    log_q = batched_log_prob(model, test, batch_size)
    nll, nll_stderr, unsolved = nll_summary(log_q)
    metrics: dict[str, Any] = {
        "test_nll": nll,
        "test_nll_stderr": nll_stderr,
        "test_nll_unsolved": unsolved,
        "n_test": len(test),
        "nll_dims": nll_dimensions(model, data),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    variants = takes_variant(model, test)
    log_q_paper, mass_paper = None, None
    if variants:
        log_q_paper = batched_log_prob(model, test, batch_size, variant="paper")
        nll_paper, stderr_paper, _ = nll_summary(log_q_paper)
        nll_encoder, stderr_encoder, _ = nll_summary(
            batched_log_prob(model, test, batch_size, variant="encoder")
        )
        metrics.update(
            test_nll_encoder=nll_encoder,
            test_nll_encoder_stderr=stderr_encoder,
            test_nll_paper=nll_paper,
            test_nll_paper_stderr=stderr_paper,
        )
    if mass_samples is None or mass_samples > 0:
        settings = {"evaluations": mass_samples, "conditions": mass_conditions, "batch_size": batch_size}
        mass = model_density_mass(model, test, **settings)
        metrics.update(_mass_metrics(mass))
        if test.c is not None:
            metrics["density_mass_conditions"] = min(mass_conditions, len(test))
        if variants:
            mass_paper = model_density_mass(model, test, variant="paper", **settings)
            metrics.update(_mass_metrics(mass_paper, "_paper"))
            metrics["test_nll_paper_normalised"] = metrics["test_nll_paper"] + mass_paper.log_mass
            metrics["test_nll_paper_normalised_stderr"] = math.hypot(
                metrics["test_nll_paper_stderr"], mass_paper.log_mass_stderr
            )
    if hasattr(model, "diagnostics"):
        sums: dict[str, float] = {}
        for i in range(0, len(test), batch_size):
            x = test.x[i : i + batch_size]
            c = None if test.c is None else test.c[i : i + batch_size]
            with torch.no_grad():
                values = model.diagnostics(x, c, log_prob=log_q[i : i + batch_size])
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + float(value) * x.shape[0]
        metrics.update({f"test_{k}": v / len(test) for k, v in sums.items()})
    if data.true_log_prob is not None:
        log_p = data.true_log_prob(test.x, test.c).double()
        metrics.update(_kl(log_p, log_q))
        metrics["true_test_nll"] = float(-log_p.mean())
        if log_q_paper is not None:
            metrics.update(_kl(log_p, log_q_paper, "_paper"))
            if mass_paper is not None:
                metrics["kl_to_truth_paper_normalised"] = metrics["kl_to_truth_paper"] + mass_paper.log_mass
                metrics["kl_to_truth_paper_normalised_stderr"] = math.hypot(
                    metrics["kl_to_truth_paper_stderr"], mass_paper.log_mass_stderr
                )
    if data.kind == "image" and "levels" in data.meta:  # from test_nll: the normalised density
        from .bits import bits_metrics

        metrics.update(bits_metrics(metrics, data.meta, nll_dimensions(model, data)))
    if molecules:  # EDM's metrics of generated molecules, and their speed
        from .molecule_generation import molecule_generation_metrics, molecule_nll_metrics

        metrics.update(molecule_nll_metrics(log_q, data, test.c))
        metrics.update(molecule_generation_metrics(model, data, data.meta["eval_samples"]))
        return metrics
    c0 = None if test.c is None else test.c[0]
    metrics["sample_seconds_per_sample"] = sampling_seconds_per_sample(model, 2000, c0)
    if data.kind == "particles" and "energy" in data.meta and particle_samples > 0:
        metrics.update(particle_metrics(model, data, particle_samples, batch_size))
    return metrics


def _kl(log_p: Tensor, log_q: Tensor, suffix: str = "") -> dict[str, float]:
    r""":math:`\mathrm{KL}(p \,\|\, q) \approx \operatorname{mean}(\log p - \log q)` over the test rows
    (draws of :math:`p`) where :math:`\log q` is not NaN, and its standard error."""
    diff = (log_p - log_q.double())[~torch.isnan(log_q)]
    stderr = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else math.nan
    return {f"kl_to_truth{suffix}": float(diff.mean()), f"kl_to_truth{suffix}_stderr": stderr}
