"""Plots for particle systems: histograms of energies and of inter-particle distances, model
samples against data, saved as PNG. matplotlib is imported inside the functions only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .particle_metrics import interparticle_distances


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy().reshape(-1)


def _histograms(series: dict[str, np.ndarray], path: str | Path, xlabel: str, bins: int, value_range) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    finite = [v[np.isfinite(v)] for v in series.values()]
    if value_range is None:
        both = np.concatenate(finite)
        value_range = tuple(np.quantile(both, [0.001, 0.999])) if both.size else (0.0, 1.0)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (label, _), values in zip(series.items(), finite, strict=True):
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

    The default range is the 0.1 % to 99.9 % quantiles of both sets, so a few exploding samples
    do not squash the plot.
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
