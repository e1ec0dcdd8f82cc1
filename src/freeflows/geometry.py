r"""Geometry of particle configurations, flattened particle-major (``x1, y1, x2, y2, ...``):
reshaping, pair indices, interparticle distances, centres of mass and centring.

:func:`center` is the one implementation of centre-of-mass removal,
:math:`x_i \mapsto x_i - \frac1N \sum_j x_j`, the projection onto the zero-centre-of-mass
subspace that equivariant flows live on; the latent
(:class:`~freeflows.distributions.MeanFreeNormal`), the data sets and the MCMC proposals call it.

Example:
    >>> import torch
    >>> from freeflows.geometry import center, center_of_mass
    >>> x = torch.tensor([[0.0, 0.0, 2.0, 4.0]])  # two particles in 2-D
    >>> center_of_mass(x, 2, 2), center(x, 2, 2)
    (tensor([[1., 2.]]), tensor([[-1., -2.,  1.,  2.]]))
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_particles(x: Tensor, n_particles: int, n_dims: int) -> Tensor:
    """Reshape flattened configurations ``[..., N*d]`` to ``[..., N, d]``, checking the size.

    Args:
        x: configurations ``[..., N*d]``.
        n_particles: :math:`N`.
        n_dims: :math:`d`.

    Returns:
        ``[..., N, d]``.

    Example:
        >>> import torch
        >>> from freeflows.geometry import as_particles
        >>> as_particles(torch.arange(6.0).reshape(1, 6), 3, 2).shape
        torch.Size([1, 3, 2])
    """
    if x.shape[-1] != n_particles * n_dims:
        raise ValueError(
            f"expected configurations of {n_particles} particles in {n_dims}-D "
            f"({n_particles * n_dims} numbers), got last dimension {x.shape[-1]}"
        )
    return x.reshape(*x.shape[:-1], n_particles, n_dims)


def pair_indices(n_particles: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Indices ``(i, j)`` of the unique pairs ``i < j``, in row-major order.

    Args:
        n_particles: :math:`N`.
        device: device of the indices.

    Returns:
        Two ``[N(N-1)/2]`` index tensors.

    Example:
        >>> from freeflows.geometry import pair_indices
        >>> pair_indices(3)
        (tensor([0, 0, 1]), tensor([1, 2, 2]))
    """
    i, j = torch.triu_indices(n_particles, n_particles, offset=1, device=device)
    return i, j


def interparticle_distances(x: Tensor, n_particles: int, n_dims: int) -> Tensor:
    r"""Distances :math:`d_{ij}`, :math:`i < j`, of flattened configurations: ``[..., N(N-1)/2]``.

    Differentiable (away from coinciding particles) and batched over any leading dimensions.

    Args:
        x: configurations ``[..., N*d]``.
        n_particles: :math:`N`.
        n_dims: :math:`d`.

    Returns:
        ``[..., N(N-1)/2]``.

    Example:
        >>> import torch
        >>> from freeflows.geometry import interparticle_distances
        >>> interparticle_distances(torch.tensor([[0.0, 0.0, 3.0, 4.0]]), 2, 2)
        tensor([[5.]])
    """
    p = as_particles(x, n_particles, n_dims)
    i, j = pair_indices(n_particles, device=x.device)
    return (p[..., i, :] - p[..., j, :]).square().sum(dim=-1).sqrt()


def center_of_mass(x: Tensor, n_particles: int, n_dims: int) -> Tensor:
    """Mean position of the particles of each configuration: ``[..., d]``.

    Args:
        x: configurations ``[..., N*d]``.
        n_particles: :math:`N`.
        n_dims: :math:`d`.

    Returns:
        ``[..., d]``.

    Example:
        >>> import torch
        >>> from freeflows.geometry import center_of_mass
        >>> center_of_mass(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 2, 2)
        tensor([[1., 2.]])
    """
    return as_particles(x, n_particles, n_dims).mean(dim=-2)


def center(x: Tensor, n_particles: int, n_dims: int, mask: Tensor | None = None) -> Tensor:
    r"""Subtract each configuration's centre of mass, :math:`x_i - \frac1N \sum_j x_j`.

    With a ``mask`` of the real particles (padded point clouds), the centre is the mean over the
    real ones, :math:`\sum_j m_j x_j / \sum_j m_j`, and is subtracted from every particle.

    Args:
        x: configurations ``[..., N*d]``, particle-major.
        n_particles: :math:`N`.
        n_dims: :math:`d`.
        mask: ``[..., N]``, true for real particles, or ``None`` for all.

    Returns:
        The centred configurations, shaped like ``x``.

    Example:
        >>> import torch
        >>> from freeflows.geometry import center
        >>> center(torch.tensor([[1.0, 2.0, 3.0]]), 3, 1)
        tensor([[-1.,  0.,  1.]])
        >>> center(torch.tensor([[1.0, 3.0, 9.0]]), 3, 1, mask=torch.tensor([[True, True, False]]))
        tensor([[-1.,  1.,  7.]])
    """
    p = as_particles(x, n_particles, n_dims)
    if mask is None:
        mean = p.mean(dim=-2, keepdim=True)
    else:
        m = mask.unsqueeze(-1).to(p.dtype)
        mean = (p * m).sum(dim=-2, keepdim=True) / m.sum(dim=-2, keepdim=True).clamp_min(1)
    return (p - mean).reshape(x.shape)


__all__ = ["as_particles", "center", "center_of_mass", "interparticle_distances", "pair_indices"]
