r"""An E(n)-equivariant graph neural network (EGNN) on fully connected particle systems.

Following the EGNN equations of Satorras, Hoogeboom and Welling (2021, arXiv:2102.09844), layer
:math:`l` updates invariant node features :math:`h_i` and coordinates :math:`x_i` of :math:`N`
particles:

.. math::
    m_{ij} &= \phi_e\big(h_i, h_j, \lVert x_i - x_j \rVert^2, \lVert x^0_i - x^0_j \rVert^2\big),
    \qquad m_{ij} \leftarrow m_{ij}\, \sigma\big(\phi_a(m_{ij})\big) \ \text{(optional gate)} \\
    \Delta_i &= \frac{1}{N-1} \sum_{j \ne i} \frac{x_i - x_j}{d_{ij} + 1}\, \phi_x(m_{ij}),
    \qquad x_i \leftarrow x_i + \Delta_i - \frac1N \sum_k \Delta_k \\
    h_i &\leftarrow h_i + \phi_h\Big(h_i, \frac{1}{N-1} \sum_{j \ne i} m_{ij}\Big)

with :math:`d_{ij} = \lVert x_i - x_j \rVert` and :math:`x^0` the input coordinates. Messages
depend on distances only, so they are invariant; coordinates move along relative vectors, so
the update is equivariant to rotations and reflections, invariant to translations, and
equivariant to permutations of particles (all nodes start with the same learned embedding).
The division by :math:`d_{ij} + 1` keeps the update bounded for distant pairs; subtracting the
mean displacement keeps the centre of mass fixed.

All activations are SiLU (smooth, since free-form encoders are differentiated twice). The last
layer of every :math:`\phi_x` starts at zero, so the total displacement
:math:`\Delta = x^L - x^0` is zero at initialisation.

* :class:`EGNN` is a flow map :math:`x \mapsto x + \Delta(x)` (global skip): the identity at
  initialisation, and its output translates with its input.
* :class:`EGNNVelocity` is a velocity field :math:`v(t, x) = \Delta(x; t)` for a continuous
  flow, with :math:`t` fed as an invariant node feature; :math:`v` is mean-free and translation
  invariant.

Coordinates are flattened particle-major, ``[B, N*d]`` as :math:`(x_1, y_1, x_2, y_2, \dots)`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Added under the square root of squared distances, so that d_ij is smooth everywhere.
DISTANCE_EPS = 1e-8


class EGNNLayer(nn.Module):
    r"""One EGNN layer (the update of the module docstring) on node features ``h [B, N, H]``
    and coordinates ``x [B, N, d]``.

    The edge MLP :math:`\phi_e` sees :math:`h_i`, :math:`h_j`, the current squared distance and
    the input squared distance; the coordinate MLP :math:`\phi_x` ends in a zero-initialised
    layer, so a new layer does not move the coordinates.

    Args:
        hidden: width :math:`H` of the node features and of every MLP.
        attention: gate every message by :math:`\sigma(\phi_a(m_{ij}))`.

    References:
        Satorras, Hoogeboom and Welling, "E(n) Equivariant Graph Neural Networks" (2021),
        arXiv:2102.09844.

    Example:
        >>> import torch
        >>> from freeflows.nets.egnn import EGNNLayer
        >>> layer = EGNNLayer(8)
        >>> h, x = torch.randn(2, 3, 8), torch.randn(2, 3, 2)
        >>> d2_0 = (x.unsqueeze(2) - x.unsqueeze(1)).square().sum(-1, keepdim=True)
        >>> mask = (1 - torch.eye(3)).unsqueeze(-1)
        >>> h_new, x_new = layer(h, x, d2_0, mask)
        >>> h_new.shape, torch.equal(x_new, x)  # coordinates do not move at initialisation
        (torch.Size([2, 3, 8]), True)
    """

    def __init__(self, hidden: int, attention: bool = True) -> None:
        super().__init__()
        # phi_e on [h_i, h_j, d2, d2_0], with its first linear map split over the inputs.
        self.source = nn.Linear(hidden, hidden)
        self.target = nn.Linear(hidden, hidden, bias=False)
        self.distances = nn.Linear(2, hidden, bias=False)
        self.message = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.gate = nn.Linear(hidden, 1) if attention else None
        out = nn.Linear(hidden, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.coordinate = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), out)
        self.node = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, h: Tensor, x: Tensor, d2_0: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Update node features and coordinates once.

        Args:
            h: node features ``[B, N, H]``.
            x: coordinates ``[B, N, d]``.
            d2_0: squared distances of the input coordinates, ``[B, N, N, 1]``.
            mask: ``[N, N, 1]``, one off the diagonal and zero on it (no self-messages).

        Returns:
            ``(h, x)``, the updated features and coordinates (same shapes).
        """
        n = x.shape[1]
        diff = x.unsqueeze(2) - x.unsqueeze(1)  # x_i - x_j: [B, N, N, d]
        d2 = diff.square().sum(dim=-1, keepdim=True)
        pre = self.source(h).unsqueeze(2) + self.target(h).unsqueeze(1)
        m = self.message(pre + self.distances(torch.cat([d2, d2_0], dim=-1)))
        if self.gate is not None:
            m = m * torch.sigmoid(self.gate(m))
        m = m * mask
        weight = self.coordinate(m) * mask / ((d2 + DISTANCE_EPS).sqrt() + 1)
        delta = (diff * weight).sum(dim=2) / (n - 1)
        delta = delta - delta.mean(dim=1, keepdim=True)
        h = h + self.node(torch.cat([h, m.sum(dim=2) / (n - 1)], dim=-1))
        return h, x + delta


class EGNN(nn.Module):
    r"""E(n)-equivariant flow map :math:`x \mapsto x + \Delta(x)` on ``n_particles`` points in
    ``n_dims`` dimensions, ``[B, N*d] -> [B, N*d]``; the identity at initialisation.

    For any rotation or reflection :math:`R`, translation :math:`t` and permutation of the
    particles :math:`P`, :math:`\mathrm{EGNN}(P(xR + t)) = P(\mathrm{EGNN}(x)R + t)`. It is the
    encoder and decoder of :meth:`freeflows.FreeFormFlow.egnn`.

    Args:
        n_particles: number of particles :math:`N \ge 2`.
        n_dims: spatial dimension :math:`d`.
        hidden: width of node features and of every MLP.
        layers: number of EGNN layers.
        attention: gate every message by :math:`\sigma(\phi_a(m_{ij}))`.
        condition_dim: number of invariant global features ``c`` (``[B, C]``), added to
            every node's initial features; 0 for none.

    References:
        Satorras, Hoogeboom and Welling, "E(n) Equivariant Graph Neural Networks" (2021),
        arXiv:2102.09844.
        Satorras, Hoogeboom, Fuchs, Posner and Welling, "E(n) Equivariant Normalizing Flows"
        (2021), arXiv:2105.09016.

    Example:
        >>> import torch
        >>> from freeflows.nets import EGNN
        >>> _ = torch.manual_seed(0)
        >>> net = EGNN(n_particles=4, n_dims=2, hidden=16, layers=2)
        >>> for p in net.parameters():  # leave the identity of initialisation
        ...     _ = p.data.normal_(0, 0.3)
        >>> x = torch.randn(3, 8)
        >>> rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # a quarter turn
        >>> turn = lambda x: (x.reshape(3, 4, 2) @ rot.T).reshape(3, 8)
        >>> torch.allclose(net(turn(x)), turn(net(x)), atol=1e-5)
        True
    """

    def __init__(
        self,
        n_particles: int,
        n_dims: int,
        hidden: int = 64,
        layers: int = 4,
        attention: bool = True,
        condition_dim: int = 0,
    ) -> None:
        super().__init__()
        if n_particles < 2 or n_dims < 1:
            raise ValueError(f"EGNN needs n_particles >= 2 and n_dims >= 1, got {n_particles}, {n_dims}")
        for name, value in (("hidden", hidden), ("layers", layers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if condition_dim < 0:
            raise ValueError(f"condition_dim must be >= 0, got {condition_dim}")
        self.n_particles = int(n_particles)
        self.n_dims = int(n_dims)
        self.condition_dim = int(condition_dim)
        self.embedding = nn.Parameter(torch.randn(hidden) / hidden**0.5)
        self.condition = nn.Linear(condition_dim, hidden, bias=False) if condition_dim else None
        self.layers = nn.ModuleList(EGNNLayer(hidden, attention) for _ in range(layers))
        mask = 1.0 - torch.eye(n_particles)
        self.register_buffer("mask", mask.unsqueeze(-1), persistent=False)

    def displacement(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        r"""The mean-free total displacement :math:`\Delta = x^L - x^0` of the layers.

        Args:
            x: coordinates ``[B, N*d]`` (any shape with ``N*d`` numbers per row), particle-major.
            c: invariant conditions ``[B, condition_dim]``; required exactly when
                ``condition_dim > 0``.

        Returns:
            :math:`\Delta`, shaped like ``x``; translation invariant and rotation equivariant.
        """
        if (c is None) != (self.condition is None):
            raise ValueError(
                f"EGNN built with condition_dim={self.condition_dim} "
                f"but c is {'missing' if c is None else 'given'}"
            )
        batch = x.shape[0]
        if x.reshape(batch, -1).shape[1] != self.n_particles * self.n_dims:
            raise ValueError(
                f"EGNN expects {self.n_particles} particles in {self.n_dims}-D "
                f"({self.n_particles * self.n_dims} numbers per row), got shape {tuple(x.shape)}"
            )
        x0 = x.reshape(batch, self.n_particles, self.n_dims)
        h = self.embedding.to(x0).expand(batch, self.n_particles, -1)
        if self.condition is not None:
            h = h + self.condition(c.to(x0)).unsqueeze(1)
        d2_0 = (x0.unsqueeze(2) - x0.unsqueeze(1)).square().sum(dim=-1, keepdim=True)
        mask = self.mask.to(x0)
        xl = x0
        for layer in self.layers:
            h, xl = layer(h, xl, d2_0, mask)
        return (xl - x0).reshape(x.shape)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        r""":math:`x + \Delta(x)`.

        Args:
            x: coordinates ``[B, N*d]``, particle-major.
            c: invariant conditions ``[B, condition_dim]``, or ``None``.

        Returns:
            Coordinates shaped like ``x``.
        """
        return x + self.displacement(x, c)

    def extra_repr(self) -> str:
        """The sizes shown by ``repr``."""
        return f"n_particles={self.n_particles}, n_dims={self.n_dims}"


class EGNNVelocity(nn.Module):
    r"""E(n)-equivariant velocity field :math:`v(t, x)` for a continuous normalizing flow.

    ``forward(t, x)`` returns the mean-free displacement :math:`\Delta(x; t)` of an :class:`EGNN`
    whose nodes all receive :math:`t` as an extra invariant feature. There is no identity skip:
    :math:`v` is translation invariant, rotation equivariant, and zero at initialisation. It is
    the field of :meth:`freeflows.CNF.egnn`.

    Args:
        n_particles: number of particles :math:`N \ge 2`.
        n_dims: spatial dimension :math:`d`.
        hidden: width of node features and of every MLP.
        layers: number of EGNN layers.
        attention: gate every message.

    References:
        Satorras, Hoogeboom, Fuchs, Posner and Welling, "E(n) Equivariant Normalizing Flows"
        (2021), arXiv:2105.09016.

    Example:
        >>> import torch
        >>> from freeflows.nets import EGNNVelocity
        >>> v = EGNNVelocity(n_particles=3, n_dims=2, hidden=8, layers=1)
        >>> x = torch.randn(5, 6)
        >>> v(0.5, x).shape, bool((v(0.5, x) == 0).all())  # zero at initialisation
        (torch.Size([5, 6]), True)
    """

    def __init__(
        self, n_particles: int, n_dims: int, hidden: int = 64, layers: int = 4, attention: bool = True
    ) -> None:
        super().__init__()
        self.net = EGNN(n_particles, n_dims, hidden, layers, attention, condition_dim=1)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """The velocity at time ``t``.

        Args:
            t: a float, a scalar tensor, or one time per row ``[B]``.
            x: coordinates ``[B, N*d]``, particle-major.

        Returns:
            :math:`v(t, x)`, shaped like ``x``, with zero mean over the particles.
        """
        t = torch.as_tensor(t).to(x)
        batch = x.shape[0]
        if t.numel() == 1:
            t = t.reshape(1, 1).expand(batch, 1)
        elif t.numel() == batch:
            t = t.reshape(batch, 1)
        else:
            raise ValueError(f"t must be a scalar or have one entry per row ({batch}), got {tuple(t.shape)}")
        return self.net.displacement(x, t)
