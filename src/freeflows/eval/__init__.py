"""Evaluation tools (tool layer; torch only): diagnostics computed from a model's contract.

* :func:`~freeflows.eval.mass.density_mass`: the integral of ``exp(log_prob)`` over the data
  space, by quadrature (≤ 2 dimensions) or importance sampling, with an error estimate.

The library (``freeflows`` minus its tool modules) never imports this package.
"""

from .mass import (
    GaussianMixtureProposal,
    MassEstimate,
    combine_masses,
    density_mass,
    importance_mass,
    quadrature_mass,
)

__all__ = [
    "GaussianMixtureProposal",
    "MassEstimate",
    "combine_masses",
    "density_mass",
    "importance_mass",
    "quadrature_mass",
]
