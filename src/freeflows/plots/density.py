"""Plots of a run (tool layer). matplotlib is imported inside each function, with the Agg backend."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.base import DataSet
from ..eval.metrics import batched_log_prob


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bounds(x: np.ndarray, margin: float = 0.15) -> list[tuple[float, float]]:
    lo, hi = np.quantile(x, 0.002, axis=0), np.quantile(x, 0.998, axis=0)
    pad = (hi - lo) * margin
    return list(zip(lo - pad, hi + pad, strict=True))


def plot_density(model: nn.Module, data: DataSet, path: Path, grid: int = 160) -> Path | None:
    """The learned density next to the data (2-D: heat maps; 1-D: curves over a histogram)."""
    if len(data.event_shape) != 1 or data.event_shape[0] > 2 or data.condition_dim is not None:
        return None
    plt = _plt()
    x = data.test.x.numpy()
    (xlo, xhi), *rest = _bounds(x)
    if data.event_shape[0] == 1:
        t = torch.linspace(xlo, xhi, 600).unsqueeze(1)
        from ..data.base import Split

        q = batched_log_prob(model, Split(t)).exp().numpy()  # NaN (unsolved) points leave gaps
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(x[:, 0], bins=120, density=True, alpha=0.4, color="gray", label="data")
        ax.plot(t[:, 0], q, label="model", color="C0")
        if data.true_log_prob is not None:
            ax.plot(t[:, 0], data.true_log_prob(t).exp().numpy(), "--", color="k", label="truth")
        ax.legend()
        ax.set_xlabel("x")
    else:
        ylo, yhi = rest[0]
        gx, gy = torch.meshgrid(torch.linspace(xlo, xhi, grid), torch.linspace(ylo, yhi, grid), indexing="xy")
        pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
        from ..data.base import Split

        q = batched_log_prob(model, Split(pts), 4000).exp().reshape(grid, grid).numpy()
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
        axes[0].hist2d(x[:, 0], x[:, 1], bins=grid // 2, range=[[xlo, xhi], [ylo, yhi]], cmap="viridis")
        axes[0].set_title("data (test split)")
        # Cap the colour scale: a free-form decoder can have isolated near-singular points whose
        # density spikes would otherwise wash out the picture. Points where log_prob is NaN (a
        # free-form flow's root solve failed there) are drawn in red and counted in the title.
        unsolved = np.isnan(q)
        vmax = float(np.nanquantile(q, 0.995)) if not unsolved.all() else 1.0
        cmap = plt.get_cmap("viridis").copy()
        cmap.set_bad("red")
        axes[1].imshow(
            np.ma.masked_invalid(q), origin="lower", extent=(xlo, xhi, ylo, yhi), cmap=cmap,
            aspect="auto", vmax=vmax,
        )
        note = f"; {int(unsolved.sum())} unsolved points (red)" if unsolved.any() else ""
        axes[1].set_title(
            f"model density, log_prob\nmax {np.nanmax(q):.3g}, colour capped at {vmax:.3g}{note}",
            fontsize=9,
        )
        for ax in axes:
            ax.set_xlim(xlo, xhi)
            ax.set_ylim(ylo, yhi)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_samples(samples: torch.Tensor, data: DataSet, path: Path) -> Path | None:
    """Model samples next to data: scatter of the first two coordinates, or 1-D histograms."""
    if len(data.event_shape) != 1:
        return None
    plt = _plt()
    x, s = data.test.x.numpy(), samples.detach().numpy()
    bounds = _bounds(x, 0.3)
    if data.event_shape[0] == 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(x[:, 0], bins=120, range=bounds[0], density=True, alpha=0.5, label="data")
        ax.hist(s[:, 0], bins=120, range=bounds[0], density=True, alpha=0.5, label="samples")
        ax.legend()
    else:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
        n = min(len(x), len(s), 5000)
        axes[0].scatter(x[:n, 0], x[:n, 1], s=1, alpha=0.5)
        axes[0].set_title("data (test split)")
        axes[1].scatter(s[:n, 0], s[:n, 1], s=1, alpha=0.5, color="C1")
        axes[1].set_title("model samples")
        axes[0].set_xlim(*bounds[0])
        axes[0].set_ylim(*bounds[1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_curves(csv_path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Read a run's ``metrics.csv`` (rows ``step,metric,value``) into one curve per metric.

    Args:
        csv_path: the ``metrics.csv`` file.

    Returns:
        ``{metric: (steps, values)}``, in the file's order.
    """
    curves: dict[str, tuple[list[int], list[float]]] = {}
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            steps, values = curves.setdefault(row["metric"], ([], []))
            steps.append(int(row["step"]))
            values.append(float(row["value"]))
    return curves


def plot_curves(csv_path: Path, path: Path) -> Path | None:
    """Training curves: loss, validation NLL, and reconstruction error when logged."""
    if not csv_path.is_file():
        return None
    curves = read_curves(csv_path)
    panels = [k for k in ("loss", "val/nll", "val/reconstruction", "train/reconstruction") if k in curves]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        steps, values = curves[key]
        ax.plot(steps, values, marker="o" if key.startswith("val") else None, ms=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        if "reconstruction" in key and min(values) > 0:
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
