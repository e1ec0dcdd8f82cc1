r"""Metrics for particle systems sampled by a density model (torch only).

**Pair distances.** A configuration of :math:`N` particles in :math:`d` dimensions is stored
flattened particle-major, :math:`x = (x_1, y_1, x_2, y_2, \dots)`. Its :math:`N(N-1)/2`
inter-particle distances :math:`d_{ij} = \lVert x_i - x_j \rVert`, :math:`i < j`, are invariant
to rotations, reflections, translations and (as a multiset) permutations.

**Effective sample size.** For draws :math:`x_k \sim q` and a target
:math:`p(x) \propto e^{-E(x)}`, the importance weights are
:math:`w_k = \exp(-E(x_k) - \log q(x_k))`, known up to a constant. The normalised effective
sample size

.. math:: \mathrm{ESS} = \frac{(\sum_k w_k)^2}{n \sum_k w_k^2} \in [1/n,\, 1]

is 1 when :math:`q = p` and tends to :math:`1/n` when one weight dominates. It is computed from
:math:`\log w` as :math:`\exp(2\,\mathrm{lse}(\log w) - \mathrm{lse}(2 \log w) - \log n)`, which
never overflows and does not depend on the unknown normalising constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..data.geometry import as_particles, center_of_mass, interparticle_distances, pair_indices  # noqa: F401


def log_importance_weights(energy: Tensor, log_q: Tensor) -> Tensor:
    r""":math:`\log w = -E(x) - \log q(x)` (unnormalised), from energies and model log-densities."""
    return -energy - log_q


def effective_sample_size(log_w: Tensor) -> Tensor:
    r"""Normalised ESS :math:`(\sum w)^2 / (n \sum w^2)` of log-weights ``[n]``, in :math:`[1/n, 1]`.

    Non-finite log-weights (NaN, or :math:`+\infty` from a model that assigns zero density to a
    sample) make the ESS undefined; they raise :class:`ValueError`. A log-weight of
    :math:`-\infty` is a zero weight and is allowed.
    """
    log_w = log_w.reshape(-1).double()
    if log_w.numel() == 0:
        raise ValueError("effective_sample_size needs at least one weight")
    if torch.isnan(log_w).any() or torch.isposinf(log_w).any():
        raise ValueError("log-weights contain NaN or +inf; the ESS is undefined")
    if torch.isneginf(log_w).all():
        raise ValueError("all weights are zero; the ESS is undefined")
    n = log_w.numel()
    log_ess = 2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0) - math.log(n)
    return log_ess.exp().clamp(max=1.0)


def model_ess(
    energy: Callable[[Tensor], Tensor],
    samples: Tensor,
    log_q: Tensor,
) -> Tensor:
    """ESS of a model's own samples against the Boltzmann target :math:`e^{-E}`."""
    return effective_sample_size(log_importance_weights(energy(samples), log_q))
