"""Plots for particle systems: histograms of energies and of inter-particle distances, model
samples against data, saved as PNG. matplotlib is imported inside the functions only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..eval.particles import interparticle_distances


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy().reshape(-1)


def _data_range(reference: np.ndarray) -> tuple[float, float]:
    """The plotted range: the reference's 0.1 % to 99.9 % quantiles, widened by a quarter of
    their span below and a whole span above (room for a hotter model), so that a few exploding
    samples neither squash the plot nor hide; values outside are counted in the legend."""
    if reference.size == 0:
        return (0.0, 1.0)
    lo, hi = np.quantile(reference, [0.001, 0.999])
    span = max(hi - lo, 1e-12)
    return (float(lo - 0.25 * span), float(hi + span))


def _histograms(
    series: dict[str, np.ndarray],
    path: str | Path,
    xlabel: str,
    bins: int,
    value_range: tuple[float, float] | None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    finite = [v[np.isfinite(v)] for v in series.values()]
    if value_range is None:
        value_range = _data_range(finite[0])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (label, raw), values in zip(series.items(), finite, strict=True):
        outside = raw.size - np.count_nonzero((values >= value_range[0]) & (values <= value_range[1]))
        if outside:
            share = 100 * outside / max(raw.size, 1)
            label = f"{label} ({f'{share:.1f}%' if share >= 0.1 else '<0.1%'} outside)"
        ax.hist(values, bins=bins, range=value_range, density=True, histtype="step", lw=1.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_energy_histogram(
    energy: Callable[[Tensor], Tensor],
    samples: Tensor,
    data: Tensor,
    path: str | Path,
    bins: int = 80,
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Histogram of :math:`E(x)` for model samples and for data; returns the PNG path.

    The default range follows the data (see :func:`_data_range`); the legend counts the samples
    that fall outside it (non-finite energies included).
    """
    with torch.no_grad():
        series = {"data": _numpy(energy(data)), "model": _numpy(energy(samples))}
    return _histograms(series, path, "energy", bins, value_range)


def plot_distance_histogram(
    samples: Tensor,
    data: Tensor,
    n_particles: int,
    n_dims: int,
    path: str | Path,
    bins: int = 80,
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Histogram of all inter-particle distances of model samples and of data; returns the path."""
    with torch.no_grad():
        series = {
            "data": _numpy(interparticle_distances(data, n_particles, n_dims)),
            "model": _numpy(interparticle_distances(samples, n_particles, n_dims)),
        }
    return _histograms(series, path, "inter-particle distance", bins, value_range)
