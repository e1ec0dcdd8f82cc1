"""Plots of the tool (matplotlib): densities, samples and training curves
(:mod:`.density`), and particle-system histograms (:mod:`.particles`)."""

from .density import _plt, plot_curves, plot_density, plot_samples

__all__ = ["_plt", "plot_curves", "plot_density", "plot_samples"]
