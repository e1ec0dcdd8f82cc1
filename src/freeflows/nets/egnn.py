r"""An E(n)-equivariant graph neural network (EGNN) on fully connected particle systems.

Following the EGNN equations of Satorras, Hoogeboom and Welling (2021), layer :math:`l` updates
invariant node features :math:`h_i` and coordinates :math:`x_i` of :math:`N` particles:

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
    """One EGNN layer (see the module docstring) on ``h [B, N, H]`` and ``x [B, N, d]``."""

    def __init__(self, hidden: int, attention: bool = True):
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
        """``d2_0``: input squared distances ``[B, N, N, 1]``; ``mask``: ``[N, N, 1]``, zero on the
        diagonal."""
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

    Args:
        n_particles: number of particles :math:`N \ge 2`.
        n_dims: spatial dimension :math:`d`.
        hidden: width of node features and of every MLP.
        layers: number of EGNN layers.
        attention: gate every message by :math:`\sigma(\phi_a(m_{ij}))`.
        condition_dim: number of invariant global features ``c`` (``[B, C]``), added to
            every node's initial features; 0 for none.
    """

    def __init__(
        self,
        n_particles: int,
        n_dims: int,
        hidden: int = 64,
        layers: int = 4,
        attention: bool = True,
        condition_dim: int = 0,
    ):
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
        r"""The mean-free total displacement :math:`\Delta = x^L - x^0`, shaped like ``x``."""
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
        return x + self.displacement(x, c)

    def extra_repr(self) -> str:
        return f"n_particles={self.n_particles}, n_dims={self.n_dims}"


class EGNNVelocity(nn.Module):
    r"""E(n)-equivariant velocity field :math:`v(t, x)` for a continuous normalizing flow.

    ``forward(t, x)`` with ``t`` a scalar tensor (or float) or a ``[B]`` tensor and ``x`` of
    shape ``[B, N*d]`` returns the mean-free displacement of an :class:`EGNN` whose nodes all
    receive :math:`t` as an extra invariant feature. There is no identity skip: :math:`v` is
    translation invariant, and zero at initialisation.
    """

    def __init__(
        self, n_particles: int, n_dims: int, hidden: int = 64, layers: int = 4, attention: bool = True
    ):
        super().__init__()
        self.net = EGNN(n_particles, n_dims, hidden, layers, attention, condition_dim=1)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        t = torch.as_tensor(t).to(x)
        batch = x.shape[0]
        if t.numel() == 1:
            t = t.reshape(1, 1).expand(batch, 1)
        elif t.numel() == batch:
            t = t.reshape(batch, 1)
        else:
            raise ValueError(f"t must be a scalar or have one entry per row ({batch}), got {tuple(t.shape)}")
        return self.net.displacement(x, t)
