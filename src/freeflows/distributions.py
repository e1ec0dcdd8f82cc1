r"""Latent distributions.

Each latent is an :class:`torch.nn.Module` (so it follows ``.to(device, dtype)``) with

* ``event_shape``: the shape of one draw;
* ``log_prob(z) -> Tensor[B]`` and ``sample(n) -> Tensor[n, *event_shape]``;
* ``basis``: ``None`` when the support is all of :math:`\mathbb{R}^D`, or an orthonormal
  matrix :math:`Q \in \mathbb{R}^{D \times m}` whose columns span the support when it is an
  ``m``-dimensional linear subspace. Log-determinants of maps between such subspaces are then
  taken of :math:`Q^\top J Q`, and Hutchinson vectors are drawn inside the subspace.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import geometry
from .checks import numel

LOG_TWO_PI = math.log(2 * math.pi)


class StandardNormal(nn.Module):
    r"""The standard normal :math:`\mathcal{N}(0, I_D)` on an event of shape ``shape``,

    .. math:: \log p(z) = -\tfrac12 \lVert z \rVert^2 - \tfrac{D}{2} \log 2\pi ,

    with :math:`D` the number of elements of one event. It follows the module's dtype and
    device (``.to(...)``, ``.double()``).

    Args:
        shape: the event shape, as integers or as one tuple.

    Example:
        >>> import torch
        >>> from freeflows import StandardNormal
        >>> latent = StandardNormal(2)
        >>> z = latent.sample(5)
        >>> z.shape, latent.log_prob(torch.zeros(1, 2))  # -log(2 pi)
        (torch.Size([5, 2]), tensor([-1.8379]))
    """

    basis: Tensor | None = None

    def __init__(self, *shape: int) -> None:
        super().__init__()
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if not shape or any(int(s) < 1 for s in shape):
            raise ValueError(f"StandardNormal needs a positive event shape, got {shape}")
        self.event_shape = tuple(int(s) for s in shape)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dim(self) -> int:
        """Degrees of freedom of the support, :math:`D`."""
        return numel(self.event_shape)

    def log_prob(self, z: Tensor) -> Tensor:
        """Log-density of a batch.

        Args:
            z: points ``[B, *event_shape]``.

        Returns:
            ``[B]``.
        """
        sq = z.reshape(z.shape[0], -1).square().sum(dim=1)
        return -0.5 * sq - 0.5 * self.dim * LOG_TWO_PI

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` points.

        Args:
            n: the number of draws.
            generator: random number generator, for reproducible draws.

        Returns:
            ``[n, *event_shape]``, in the module's dtype and on its device.
        """
        return torch.randn(
            (n, *self.event_shape),
            generator=generator,
            device=self._anchor.device,
            dtype=self._anchor.dtype,
        )

    def extra_repr(self) -> str:
        """The event shape, shown by ``repr``."""
        return f"event_shape={self.event_shape}"


def mean_free_basis(n_particles: int, n_dims: int) -> Tensor:
    r"""Orthonormal basis :math:`Q \in \mathbb{R}^{Nd \times (N-1)d}` of zero-centre-of-mass
    configurations, flattened particle-major (``x1, y1, x2, y2, ...``).

    Per coordinate axis, the Helmert vectors :math:`h_k = (1, \dots, 1, -k, 0, \dots) /
    \sqrt{k(k+1)}` (``k`` ones) are orthonormal and orthogonal to :math:`\mathbf 1`;
    :math:`Q = H \otimes I_d`.

    Args:
        n_particles: :math:`N \ge 2`.
        n_dims: :math:`d \ge 1`.

    Returns:
        :math:`Q`, ``[N*d, (N-1)*d]``, in float64.

    Example:
        >>> import torch
        >>> from freeflows.distributions import mean_free_basis
        >>> q = mean_free_basis(3, 2)
        >>> q.shape, torch.allclose(q.T @ q, torch.eye(4, dtype=torch.float64))
        (torch.Size([6, 4]), True)
        >>> torch.allclose(q.reshape(3, 2, 4).sum(0), torch.zeros(2, 4, dtype=torch.float64))
        True
    """
    n = n_particles
    h = torch.zeros(n, n - 1, dtype=torch.float64)
    for k in range(1, n):
        h[:k, k - 1] = 1.0
        h[k, k - 1] = -float(k)
        h[:, k - 1] /= math.sqrt(k * (k + 1))
    return torch.kron(h, torch.eye(n_dims, dtype=torch.float64))


class MeanFreeNormal(nn.Module):
    r"""Standard normal on configurations of ``n_particles`` points in ``n_dims`` dimensions whose
    centre of mass is zero.

    The support is the :math:`m = (N-1)d`-dimensional subspace :math:`\{x : \sum_i x_i = 0\}`.
    In orthonormal coordinates :math:`y = Q^\top x` of that subspace the density is
    :math:`\mathcal N(0, I_m)`, hence for :math:`x` in the subspace (where
    :math:`\lVert Q^\top x \rVert = \lVert x \rVert`)

    .. math:: \log p(x) = -\tfrac12 \lVert x \rVert^2 - \tfrac{(N-1)d}{2} \log 2\pi .

    This is the density with respect to the Lebesgue measure of the subspace, the convention that
    equivariant-flow papers report. ``log_prob`` first removes any centre-of-mass component of its
    input (it measures the projected point); events are flattened to ``[N * d]``. The ``basis``
    :math:`Q` (:func:`mean_free_basis`) tells the models to take log-determinants and Hutchinson
    probes within the subspace.

    Args:
        n_particles: :math:`N \ge 2`.
        n_dims: :math:`d \ge 1`.

    References:
        Satorras, Hoogeboom, Fuchs, Posner and Welling, "E(n) Equivariant Normalizing Flows"
        (2021), arXiv:2105.09016.

    Example:
        >>> import torch
        >>> from freeflows import MeanFreeNormal
        >>> latent = MeanFreeNormal(3, 2)
        >>> z = latent.sample(4)
        >>> z.shape, latent.dim, torch.allclose(z.reshape(4, 3, 2).sum(1), torch.zeros(4, 2), atol=1e-6)
        (torch.Size([4, 6]), 4, True)
        >>> latent.log_prob(torch.zeros(1, 6))  # -(4/2) log(2 pi)
        tensor([-3.6758])
    """

    def __init__(self, n_particles: int, n_dims: int) -> None:
        super().__init__()
        if n_particles < 2 or n_dims < 1:
            raise ValueError(
                f"MeanFreeNormal needs n_particles >= 2 and n_dims >= 1, got {n_particles}, {n_dims}"
            )
        self.n_particles = int(n_particles)
        self.n_dims = int(n_dims)
        self.event_shape = (self.n_particles * self.n_dims,)
        self.register_buffer("basis", mean_free_basis(n_particles, n_dims).float(), persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MeanFreeNormal:
        # Rebuild the basis in the new dtype rather than casting float32 values, so that it stays
        # orthonormal to working precision in float64.
        super()._apply(fn, recurse)
        exact = mean_free_basis(self.n_particles, self.n_dims)
        self.basis = exact.to(device=self.basis.device, dtype=self.basis.dtype)
        return self

    @property
    def dim(self) -> int:
        """Degrees of freedom of the support, :math:`(N-1)d`."""
        return (self.n_particles - 1) * self.n_dims

    def center(self, x: Tensor) -> Tensor:
        r"""Subtract each configuration's centre of mass, :math:`x_i - \frac1N \sum_j x_j`.

        Args:
            x: configurations ``[B, N*d]`` (or any shape ``[B, ...]`` with ``N*d`` numbers per
                row), particle-major.

        Returns:
            The centred configurations, shaped like ``x``.
        """
        return geometry.center(x.reshape(x.shape[0], -1), self.n_particles, self.n_dims).reshape(x.shape)

    def log_prob(self, z: Tensor) -> Tensor:
        """Log-density of a batch, of the centred points (see the class docstring).

        Args:
            z: configurations ``[B, N*d]``.

        Returns:
            ``[B]``.
        """
        sq = self.center(z).reshape(z.shape[0], -1).square().sum(dim=1)
        return -0.5 * sq - 0.5 * self.dim * LOG_TWO_PI

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` configurations with zero centre of mass.

        Args:
            n: the number of draws.
            generator: random number generator, for reproducible draws.

        Returns:
            ``[n, N*d]``, in the module's dtype and on its device.
        """
        eps = torch.randn(
            (n, *self.event_shape), generator=generator, device=self.basis.device, dtype=self.basis.dtype
        )
        return self.center(eps)

    def extra_repr(self) -> str:
        """The sizes shown by ``repr``."""
        return f"n_particles={self.n_particles}, n_dims={self.n_dims}"


class MaskedMeanFreeNormal(nn.Module):
    r"""Standard normal on padded point clouds of varying size: mean-free Gaussian coordinates
    and standard normal features on each row's real points, nothing on the padding.

    An event is ``[N, d + k]``: per node :math:`d` coordinates and :math:`k` invariant features
    (:mod:`freeflows.point_clouds`). The number of real points :math:`n` of a row is the last
    column of the condition ``c`` (``[B, C]``); the first :math:`n` nodes are real. The support of
    the row is the subspace :math:`S_n` of dimension :math:`m_n = (n-1)d + nk` (coordinates
    mean-free over the real points, padding zero), and on it

    .. math:: \log p(z \mid n) = -\tfrac12 \lVert P_n z \rVert^2 - \tfrac{m_n}{2} \log 2\pi ,

    with :math:`P_n` the orthogonal projection onto :math:`S_n`
    (:func:`freeflows.point_clouds.project`): the density with respect to the Lebesgue measure of
    :math:`S_n`, :math:`\mathcal N(0, I)` in orthonormal coordinates of the subspace.
    ``log_prob`` measures the projected point, so padding content and a translation of the real
    points do not change it.

    The support differs from row to row, so ``basis`` is ``None`` and models take
    log-determinants on all :math:`N(d+k)` coordinates. That equals the log-determinant on
    :math:`S_n` exactly when the model's map sends :math:`S_n` into itself and is the identity
    on its orthogonal complement (translations of the real points, and the padding): the
    Jacobian is then block-diagonal with an identity block. The masked
    :class:`~freeflows.nets.EGNN` (``x + \Delta(x)`` with :math:`\Delta` translation invariant,
    mean-free, zero on the padding and blind to it) and the masked
    :class:`~freeflows.nets.EGNNVelocity` (whose trace gains nothing from the complement) have
    this property; a generic network does not.

    Args:
        max_points: :math:`N`, the padded number of nodes.
        n_dims: :math:`d`, coordinates per node.
        features: :math:`k`, invariant feature channels per node.

    References:
        Satorras, Hoogeboom, Fuchs, Posner and Welling, "E(n) Equivariant Normalizing Flows"
        (2021), arXiv:2105.09016.

    Example:
        >>> import torch
        >>> from freeflows.distributions import MaskedMeanFreeNormal
        >>> latent = MaskedMeanFreeNormal(4, 3, features=2)
        >>> c = torch.tensor([[2.0], [4.0]])  # 2 and 4 real points
        >>> z = latent.sample(2, c)
        >>> z.shape, bool((z[0, 2:] == 0).all())  # padding is zero
        (torch.Size([2, 4, 5]), True)
        >>> latent.log_prob(torch.zeros(2, 4, 5), c) / -0.5 / math.log(2 * math.pi)  # m_n
        tensor([ 7., 17.])
    """

    basis: Tensor | None = None

    def __init__(self, max_points: int, n_dims: int, features: int = 0) -> None:
        super().__init__()
        if max_points < 1 or n_dims < 1 or features < 0:
            raise ValueError(
                "MaskedMeanFreeNormal needs max_points >= 1, n_dims >= 1 and features >= 0, "
                f"got {max_points}, {n_dims}, {features}"
            )
        self.max_points = int(max_points)
        self.n_dims = int(n_dims)
        self.features = int(features)
        self.event_shape = (self.max_points, self.n_dims + self.features)
        #: The atom count is one condition column (the last one).
        self.condition_dim = 1
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def degrees_of_freedom(self, c: Tensor) -> Tensor:
        r""":math:`m_n = (n-1)d + nk` of each row.

        Args:
            c: conditions ``[B, C]``, the point count last.

        Returns:
            ``[B]`` int64.
        """
        from .point_clouds import degrees_of_freedom

        return degrees_of_freedom(c, self.max_points, self.n_dims, self.features)

    def project(self, z: Tensor, c: Tensor) -> Tensor:
        r"""The projection :math:`P_n z` of each row onto its support.

        Args:
            z: events ``[B, N, d + k]``.
            c: conditions ``[B, C]``, the point count last.

        Returns:
            Shaped like ``z``.
        """
        from .point_clouds import project

        return project(z, c, self.n_dims)

    def log_prob(self, z: Tensor, c: Tensor) -> Tensor:
        """Log-density of a batch (see the class docstring), of the projected points.

        Args:
            z: events ``[B, N, d + k]``.
            c: conditions ``[B, C]``, the point count last.

        Returns:
            ``[B]``.
        """
        sq = self.project(z, c).reshape(z.shape[0], -1).square().sum(dim=1)
        return -0.5 * sq - 0.5 * self.degrees_of_freedom(c).to(sq.dtype) * LOG_TWO_PI

    def sample(self, n: int, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` events, row ``i`` with the point count of ``c[i]``.

        Args:
            n: the number of draws.
            c: conditions ``[n, C]``, the point count last.
            generator: random number generator, for reproducible draws.

        Returns:
            ``[n, N, d + k]``, in the module's dtype and on its device; zero on the padding.
        """
        if c is None or c.shape[0] != n:
            shape = None if c is None else tuple(c.shape)
            raise ValueError(f"MaskedMeanFreeNormal.sample(n, c) needs c of shape [n, C], got {shape}")
        eps = torch.randn(
            (n, *self.event_shape), generator=generator, device=self._anchor.device, dtype=self._anchor.dtype
        )
        return self.project(eps, c.to(eps))

    def extra_repr(self) -> str:
        """The sizes shown by ``repr``."""
        return f"max_points={self.max_points}, n_dims={self.n_dims}, features={self.features}"
