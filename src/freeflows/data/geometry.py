"""Geometry of particle configurations, flattened particle-major (``x1, y1, x2, y2, ...``):
reshaping, pair indices, interparticle distances and centres of mass."""

from __future__ import annotations

import torch
from torch import Tensor


def as_particles(x: Tensor, n_particles: int, n_dims: int) -> Tensor:
    """Reshape flattened configurations ``[B, N*d]`` to ``[B, N, d]``, checking the size."""
    if x.shape[-1] != n_particles * n_dims:
        raise ValueError(
            f"expected configurations of {n_particles} particles in {n_dims}-D "
            f"({n_particles * n_dims} numbers), got last dimension {x.shape[-1]}"
        )
    return x.reshape(*x.shape[:-1], n_particles, n_dims)


def pair_indices(n_particles: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Indices ``(i, j)`` of the unique pairs ``i < j``, in row-major order."""
    i, j = torch.triu_indices(n_particles, n_particles, offset=1, device=device)
    return i, j


def interparticle_distances(x: Tensor, n_particles: int, n_dims: int) -> Tensor:
    r"""Distances :math:`d_{ij}`, :math:`i < j`, of flattened configurations: ``[B, N(N-1)/2]``.

    Differentiable (away from coinciding particles) and batched over any leading dimensions.
    """
    p = as_particles(x, n_particles, n_dims)
    i, j = pair_indices(n_particles, device=x.device)
    return (p[..., i, :] - p[..., j, :]).square().sum(dim=-1).sqrt()


def center_of_mass(x: Tensor, n_particles: int, n_dims: int) -> Tensor:
    """Mean position of the particles of each configuration: ``[B, d]``."""
    return as_particles(x, n_particles, n_dims).mean(dim=-2)
