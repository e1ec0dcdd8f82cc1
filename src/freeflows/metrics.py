r"""Test metrics of a trained model on a data set (tool layer; torch only).

For particle systems (``data.kind == "particles"``, with ``data.meta["energy"]``) the metrics
also judge the model as a Boltzmann generator (see :func:`particle_metrics`): the effective
sample size of importance weights :math:`\exp(-E(x) - \log q(x))` of the model's own samples,
and their energies against the data's. Everything uses only the model contract
(``log_prob``/``sample``), never the model's class.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .data.base import DataSet, Split

#: For particle data, rows per ``log_prob`` batch times the event size is at most this.
PARTICLE_ELEMENTS = 4096


def batched_log_prob(model: nn.Module, split: Split, batch_size: int = 1000) -> torch.Tensor:
    """Exact ``log_prob`` of every row of a split, in batches, under ``torch.no_grad`` (as in
    validation): no graph back to the parameters is kept, which for a CNF with the exact trace is
    the difference between megabytes and gigabytes."""
    out = []
    with torch.no_grad():
        for i in range(0, len(split), batch_size):
            x = split.x[i : i + batch_size]
            c = None if split.c is None else split.c[i : i + batch_size]
            out.append(model.log_prob(x, c).detach())
    return torch.cat(out)


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


def nll_dimensions(model: nn.Module, data: DataSet) -> int:
    """Degrees of freedom of the space in which ``log_prob`` is a density: the latent's ``dim``
    (e.g. :math:`(N-1)d` for a mean-free latent), else the number of elements of an event."""
    dim = getattr(getattr(model, "latent", None), "dim", None)
    if isinstance(dim, int):
        return dim
    return int(torch.Size(data.event_shape).numel())


def particle_metrics(
    model: nn.Module, data: DataSet, n_samples: int = 2000, batch_size: int = 1000, seed: int = 0
) -> dict[str, Any]:
    r"""Boltzmann-generator metrics of ``n_samples`` model draws (``data.meta["energy"]`` is the
    target energy :math:`E` at temperature 1):

    * ``ess``: normalised effective sample size :math:`(\sum w)^2 / (n \sum w^2) \in [1/n, 1]` of
      :math:`\log w = -E(x) - \log q(x)`, with the exact ``log_prob`` of the samples. Samples whose
      log-weight is NaN or :math:`+\infty` (non-finite sample, energy or density) are dropped and
      counted in ``ess_dropped``; an infinite energy is a zero weight and is kept. ``ess`` is
      ``None`` when no weight is usable.
    * ``sample_energy_mean`` / ``_median`` over the finite sample energies (``sample_energy_nonfinite``
      counts the others; LJ energies of overlapping particles overflow), and ``data_energy_mean`` /
      ``_median`` of the test split; ``ess_samples``, the number of draws.
    """
    from .particle_metrics import effective_sample_size, log_importance_weights

    energy = data.meta["energy"]
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            samples = torch.cat(
                [model.sample(min(batch_size, n_samples - i)) for i in range(0, n_samples, batch_size)]
            )
    finally:
        torch.random.set_rng_state(gen_state)
    log_q = batched_log_prob(model, Split(samples), batch_size)
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


def evaluate_model(
    model: nn.Module,
    data: DataSet,
    batch_size: int = 1000,
    particle_samples: int = 2000,
    test_rows: int | None = None,
) -> dict[str, Any]:
    """Test NLL (exact), diagnostics, KL to the truth when the density is known, parameter count
    and sampling time; for particle data also :func:`particle_metrics` on ``particle_samples``
    draws. ``nll_dims`` is the dimension of the space in which the NLL is a density (for a
    mean-free latent, the :math:`(N-1)d`-dimensional zero-centre-of-mass subspace).
    For particle data, ``log_prob`` batches hold at most ``PARTICLE_ELEMENTS // D`` rows.
    ``test_rows`` evaluates only the first rows of the test split (``n_test`` says how many)."""
    model.eval()
    if data.kind == "particles":
        # Exact densities of equivariant nets hold [rows * D, N, N, hidden] tensors: bound memory.
        batch_size = min(batch_size, max(1, PARTICLE_ELEMENTS // int(torch.Size(data.event_shape).numel())))
    test = data.test
    if test_rows is not None and test_rows < len(test):
        test = Split(test.x[:test_rows], None if test.c is None else test.c[:test_rows])
    log_q = batched_log_prob(model, test, batch_size)
    metrics: dict[str, Any] = {
        "test_nll": float(-log_q.mean()),
        "test_nll_stderr": float(log_q.std() / len(log_q) ** 0.5),
        "n_test": len(test),
        "nll_dims": nll_dimensions(model, data),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
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
        diff = log_p - log_q.double()
        metrics["kl_to_truth"] = float(diff.mean())
        metrics["kl_to_truth_stderr"] = float(diff.std() / len(diff) ** 0.5)
        metrics["true_test_nll"] = float(-log_p.mean())
    c0 = None if test.c is None else test.c[0]
    metrics["sample_seconds_per_sample"] = sampling_seconds_per_sample(model, 2000, c0)
    if data.kind == "particles" and "energy" in data.meta and particle_samples > 0:
        metrics.update(particle_metrics(model, data, particle_samples, batch_size))
    return metrics
