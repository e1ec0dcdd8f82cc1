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

**Features and masks** (molecules). With ``features = k > 0`` every node also carries :math:`k`
invariant feature channels in the event (``[B, N, d + k]``, or ``N*(d+k)`` numbers per row,
node-major): they feed the initial node embedding, and the flow map moves them too,
:math:`h \mapsto h + \Delta_h` with :math:`\Delta_h` a zero-initialised linear read-out of the
last node embeddings, so the map acts on :math:`(x, h)` jointly and is the identity at
initialisation. With ``masked=True`` the last column of the condition ``c`` is the number
:math:`n` of real nodes (:mod:`freeflows.point_clouds`), the first :math:`n` of each row; the
others are padding. Then messages pass only between real nodes, the sums above run over the
:math:`n-1` real neighbours and the mean displacement is taken over the :math:`n` real nodes, the
padding's content is set to zero before the layers (so it cannot change anything), and the
padding's output equals its input. The map is therefore the identity on the padding and on
translations of the real nodes, which is what :class:`~freeflows.distributions.MaskedMeanFreeNormal`
needs for exact log-determinants.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..geometry import center

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

    def forward(
        self, h: Tensor, x: Tensor, d2_0: Tensor, mask: Tensor, nodes: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Update node features and coordinates once.

        Args:
            h: node features ``[B, N, H]``.
            x: coordinates ``[B, N, d]``.
            d2_0: squared distances of the input coordinates, ``[B, N, N, 1]``.
            mask: edge mask, ``[N, N, 1]`` or ``[B, N, N, 1]``: one between two real nodes and
                zero on the diagonal (no self-messages) and wherever a padding node is involved.
            nodes: node mask ``[B, N, 1]`` (one on real nodes), or ``None`` when all ``N`` nodes
                are real.

        Returns:
            ``(h, x)``, the updated features and coordinates (same shapes); with ``nodes``, the
            coordinates of padding nodes do not move.
        """
        diff = x.unsqueeze(2) - x.unsqueeze(1)  # x_i - x_j: [B, N, N, d]
        d2 = diff.square().sum(dim=-1, keepdim=True)
        pre = self.source(h).unsqueeze(2) + self.target(h).unsqueeze(1)
        m = self.message(pre + self.distances(torch.cat([d2, d2_0], dim=-1)))
        if self.gate is not None:
            m = m * torch.sigmoid(self.gate(m))
        m = m * mask
        weight = self.coordinate(m) * mask / ((d2 + DISTANCE_EPS).sqrt() + 1)
        if nodes is None:
            neighbours = x.shape[1] - 1
            delta = (diff * weight).sum(dim=2) / neighbours
            delta = center(delta.flatten(1), *delta.shape[1:]).view_as(delta)
        else:
            count = nodes.sum(dim=1, keepdim=True)  # [B, 1, 1]
            neighbours = (count - 1).clamp(min=1)
            delta = (diff * weight).sum(dim=2) / neighbours
            delta = center(delta.flatten(1), *delta.shape[1:], mask=nodes[..., 0] > 0).view_as(delta) * nodes
        h = h + self.node(torch.cat([h, m.sum(dim=2) / neighbours], dim=-1))
        return h, x + delta


class EGNN(nn.Module):
    r"""E(n)-equivariant flow map :math:`x \mapsto x + \Delta(x)` on ``n_particles`` points in
    ``n_dims`` dimensions, ``[B, N*d] -> [B, N*d]``; the identity at initialisation.

    For any rotation or reflection :math:`R`, translation :math:`t` and permutation of the
    particles :math:`P`, :math:`\mathrm{EGNN}(P(xR + t)) = P(\mathrm{EGNN}(x)R + t)`. It is the
    encoder and decoder of :meth:`freeflows.FreeFormFlow.egnn`. With ``features`` and ``masked``
    (module docstring) it maps padded molecules ``[B, N, d + k]``, coordinates and invariant
    features jointly, :math:`(x, h) \mapsto (x + \Delta_x, h + \Delta_h)`; it is then the
    encoder and decoder of :meth:`freeflows.FreeFormFlow.molecules`, and a permutation of the
    real nodes among themselves is a symmetry.

    Args:
        n_particles: number of particles :math:`N \ge 2` (the padded size when ``masked``).
        n_dims: spatial dimension :math:`d`.
        hidden: width of node features and of every MLP.
        layers: number of EGNN layers.
        attention: gate every message by :math:`\sigma(\phi_a(m_{ij}))`.
        condition_dim: number of invariant global features ``c`` (``[B, C]``), added to
            every node's initial features; 0 for none. With ``masked`` it counts the node count,
            the last column (fed to the nodes as :math:`n/N`), so it is at least 1.
        features: invariant feature channels :math:`k` per node in the event.
        masked: the last column of ``c`` is the number of real nodes; the rest is padding.

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

        Padded molecules: 5 nodes with 3 coordinates and 2 features, 3 and 5 real nodes.

        >>> mol = EGNN(5, 3, hidden=16, layers=2, condition_dim=1, features=2, masked=True)
        >>> for p in mol.parameters():
        ...     _ = p.data.normal_(0, 0.3)
        >>> x, c = torch.randn(2, 5, 5), torch.tensor([[3.0], [5.0]])
        >>> x[0, 3:] = 0.0  # padding
        >>> y = mol(x, c)
        >>> bool((y[0, 3:] == 0).all()), bool((y - x).abs().max() > 0.01)
        (True, True)
    """

    def __init__(
        self,
        n_particles: int,
        n_dims: int,
        hidden: int = 64,
        layers: int = 4,
        attention: bool = True,
        condition_dim: int = 0,
        *,
        features: int = 0,
        masked: bool = False,
    ) -> None:
        super().__init__()
        if n_particles < 2 or n_dims < 1:
            raise ValueError(f"EGNN needs n_particles >= 2 and n_dims >= 1, got {n_particles}, {n_dims}")
        for name, value in (("hidden", hidden), ("layers", layers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if condition_dim < 0 or features < 0:
            raise ValueError(f"condition_dim and features must be >= 0, got {condition_dim}, {features}")
        if masked and condition_dim < 1:
            raise ValueError(
                "a masked EGNN reads the node count from the last column of c: condition_dim >= 1"
            )
        self.n_particles = int(n_particles)
        self.n_dims = int(n_dims)
        self.condition_dim = int(condition_dim)
        self.features = int(features)
        self.masked = bool(masked)
        self.embedding = nn.Parameter(torch.randn(hidden) / hidden**0.5)
        self.condition = nn.Linear(condition_dim, hidden, bias=False) if condition_dim else None
        self.layers = nn.ModuleList(EGNNLayer(hidden, attention) for _ in range(layers))
        if self.features:
            self.feature_in = nn.Linear(self.features, hidden, bias=False)
            self.feature_out = nn.Linear(hidden, self.features)
            nn.init.zeros_(self.feature_out.weight)
            nn.init.zeros_(self.feature_out.bias)
        mask = 1.0 - torch.eye(n_particles)
        self.register_buffer("mask", mask.unsqueeze(-1), persistent=False)

    def displacement(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        r"""The total displacement :math:`\Delta = (x^L - x^0, \Delta_h)` of the layers.

        Args:
            x: events ``[B, N*(d+k)]`` (any shape with ``N*(d+k)`` numbers per row), node-major.
            c: invariant conditions ``[B, condition_dim]``; required exactly when
                ``condition_dim > 0``. With ``masked``, the last column is the node count.

        Returns:
            :math:`\Delta`, shaped like ``x``: translation invariant and rotation equivariant in
            the coordinates, invariant in the features, mean-free over the real nodes, and zero
            on padding nodes.
        """
        if (c is None) != (self.condition is None):
            raise ValueError(
                f"EGNN built with condition_dim={self.condition_dim} "
                f"but c is {'missing' if c is None else 'given'}"
            )
        batch, width = x.shape[0], self.n_dims + self.features
        if x.reshape(batch, -1).shape[1] != self.n_particles * width:
            what = f"{self.n_particles} particles in {self.n_dims}-D"
            if self.features:
                what += f" with {self.features} features"
            raise ValueError(
                f"EGNN expects {what} ({self.n_particles * width} numbers per row), "
                f"got shape {tuple(x.shape)}"
            )
        rows = x.reshape(batch, self.n_particles, width)
        x0, feats = rows[..., : self.n_dims], rows[..., self.n_dims :]
        h = self.embedding.to(x0).expand(batch, self.n_particles, -1)
        nodes, edges = None, self.mask.to(x0)
        if self.masked:
            from ..point_clouds import node_mask

            nodes = node_mask(c, self.n_particles, check=False).to(x0).unsqueeze(-1)  # [B, N, 1]
            edges = edges * nodes.unsqueeze(2) * nodes.unsqueeze(1)
            x0, feats = x0 * nodes, feats * nodes
            c = torch.cat([c[:, :-1], c[:, -1:] / self.n_particles], dim=1)
        if self.features:
            h = h + self.feature_in(feats)
        if self.condition is not None:
            h = h + self.condition(c.to(x0)).unsqueeze(1)
        d2_0 = (x0.unsqueeze(2) - x0.unsqueeze(1)).square().sum(dim=-1, keepdim=True)
        xl = x0
        for layer in self.layers:
            h, xl = layer(h, xl, d2_0, edges, nodes)
        delta = xl - x0
        if self.features:
            dh = self.feature_out(h)
            delta = torch.cat([delta, dh if nodes is None else dh * nodes], dim=-1)
        return delta.reshape(x.shape)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        r""":math:`x + \Delta(x)`.

        Args:
            x: events ``[B, N*(d+k)]`` or ``[B, N, d + k]``, node-major.
            c: invariant conditions ``[B, condition_dim]``, or ``None``.

        Returns:
            Events shaped like ``x``.
        """
        return x + self.displacement(x, c)

    def extra_repr(self) -> str:
        """The sizes shown by ``repr``."""
        extra = f", features={self.features}, masked={self.masked}" if self.features or self.masked else ""
        return f"n_particles={self.n_particles}, n_dims={self.n_dims}{extra}"


class EGNNVelocity(nn.Module):
    r"""E(n)-equivariant velocity field :math:`v(t, x)` for a continuous normalizing flow.

    ``forward(t, x)`` returns the mean-free displacement :math:`\Delta(x; t)` of an :class:`EGNN`
    whose nodes all receive :math:`t` as an extra invariant feature. There is no identity skip:
    :math:`v` is translation invariant, rotation equivariant, and zero at initialisation. It is
    the field of :meth:`freeflows.CNF.egnn`. With ``features`` and ``masked`` it is a field on
    padded molecules, ``forward(t, x, c)`` with the node count the last column of ``c``
    (``[B, 1]``); it is zero on the padding and does not depend on it, so its divergence on all
    coordinates equals that on the real nodes' mean-free subspace.

    Args:
        n_particles: number of particles :math:`N \ge 2` (the padded size when ``masked``).
        n_dims: spatial dimension :math:`d`.
        hidden: width of node features and of every MLP.
        layers: number of EGNN layers.
        attention: gate every message.
        features: invariant feature channels per node in the event.
        masked: ``forward`` takes ``c`` whose last column is the node count.

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
        self,
        n_particles: int,
        n_dims: int,
        hidden: int = 64,
        layers: int = 4,
        attention: bool = True,
        *,
        features: int = 0,
        masked: bool = False,
    ) -> None:
        super().__init__()
        self.masked = bool(masked)
        #: Condition features that ``forward`` takes: the node count when masked.
        self.condition_dim = 1 if masked else 0
        self.net = EGNN(
            n_particles, n_dims, hidden, layers, attention, condition_dim=1 + self.condition_dim,
            features=features, masked=masked,
        )

    def forward(self, t: Tensor | float, x: Tensor, c: Tensor | None = None) -> Tensor:
        """The velocity at time ``t``.

        Args:
            t: a float, a scalar tensor, or one time per row ``[B]``.
            x: events ``[B, N*(d+k)]`` (or ``[B, N, d + k]``), node-major.
            c: ``[B, 1]`` node counts when ``masked``, else ``None``.

        Returns:
            :math:`v(t, x)`, shaped like ``x``, with zero mean over the (real) particles.
        """
        t = torch.as_tensor(t).to(x)
        batch = x.shape[0]
        if t.numel() == 1:
            t = t.reshape(1, 1).expand(batch, 1)
        elif t.numel() == batch:
            t = t.reshape(batch, 1)
        else:
            raise ValueError(f"t must be a scalar or have one entry per row ({batch}), got {tuple(t.shape)}")
        if self.masked != (c is not None):
            raise ValueError(
                "a masked EGNNVelocity needs c (the node counts, [B, 1])" if self.masked
                else "this EGNNVelocity is not masked and takes no condition"
            )
        return self.net.displacement(x, t if c is None else torch.cat([t, c.to(x)], dim=1))
