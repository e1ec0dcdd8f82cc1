"""Particle geometry for the tool's data sets and metrics: the library's :mod:`freeflows.geometry`
(reshaping, pair indices, distances, centres of mass, centring), under its former path."""

from ..geometry import as_particles, center, center_of_mass, interparticle_distances, pair_indices

__all__ = ["as_particles", "center", "center_of_mass", "interparticle_distances", "pair_indices"]
