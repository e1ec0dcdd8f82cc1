r"""A residual MLP that starts as the identity.

.. math:: h_{k+1} = h_k + r_k([h_k, c]), \qquad r_k = L_{\text{out}} \circ \sigma \circ L \circ
   \dots \circ \sigma \circ L_{\text{in}}

with :math:`\sigma` = SiLU (smooth, because free-form encoders are differentiated twice). The last
linear layer of every residual branch is initialised to zero, so at initialisation every
:math:`r_k \equiv 0` and the network is exactly the identity. Its gradient is not zero, so it
trains.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResidualBlock(nn.Module):
    r"""One residual block whose branch starts at zero:

    .. math:: h \mapsto h + r([h, c]), \qquad r = L_{\text{out}} \circ \sigma \circ L \circ
       \dots \circ \sigma \circ L_{\text{in}},

    with ``depth`` hidden layers of width ``hidden``, :math:`\sigma` = SiLU, and
    :math:`L_{\text{out}}` initialised to zero.

    Args:
        features: size of ``h``.
        hidden: width of the hidden layers.
        depth: number of hidden layers (``>= 1``).
        condition_dim: size of the condition ``c``; ``0`` for none.

    References:
        He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition" (2015),
        arXiv:1512.03385.

    Example:
        >>> import torch
        >>> from freeflows.nets import ResidualBlock
        >>> block = ResidualBlock(3, hidden=16, depth=2)
        >>> h = torch.randn(4, 3)
        >>> torch.equal(block(h), h)  # the identity at initialisation
        True
    """

    def __init__(self, features: int, hidden: int, depth: int, condition_dim: int = 0) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [nn.Linear(features + condition_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        out = nn.Linear(hidden, features)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        layers.append(out)
        self.branch = nn.Sequential(*layers)

    def forward(self, h: Tensor, c: Tensor | None = None) -> Tensor:
        """:math:`h + r([h, c])`.

        Args:
            h: inputs ``[B, features]``.
            c: conditions ``[B, condition_dim]``, or ``None``.

        Returns:
            ``[B, features]``.
        """
        inp = h if c is None else torch.cat([h, c], dim=-1)
        return h + self.branch(inp)


class ResNet(nn.Module):
    r"""Residual MLP ``features -> features`` that starts as the identity: ``blocks`` residual
    blocks (:class:`ResidualBlock`), each a branch of ``depth`` hidden layers of width ``hidden``
    (see the module docstring). With ``condition_dim > 0`` it takes a condition ``c`` of that
    many features, fed to every block. Any event shape with ``features`` elements is flattened
    and restored.

    It is the default encoder and decoder of :meth:`freeflows.FreeFormFlow.resnet`; the free-form
    flow differentiates it with one structured forward pass (:mod:`freeflows.tangents`).

    Args:
        features: number of elements of one input.
        hidden: width of the hidden layers.
        depth: hidden layers per residual branch.
        blocks: number of residual blocks.
        condition_dim: size of the condition ``c``; ``0`` for an unconditional network.

    References:
        He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition" (2015),
        arXiv:1512.03385.

    Example:
        >>> import torch
        >>> from freeflows.nets import ResNet
        >>> net = ResNet(2, hidden=32, condition_dim=1)
        >>> x, c = torch.randn(5, 2), torch.randn(5, 1)
        >>> torch.equal(net(x, c), x)  # the identity at initialisation
        True
    """

    def __init__(
        self,
        features: int,
        hidden: int = 128,
        depth: int = 2,
        blocks: int = 2,
        condition_dim: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("features", features), ("hidden", hidden), ("blocks", blocks)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if condition_dim < 0:
            raise ValueError(f"condition_dim must be >= 0, got {condition_dim}")
        self.features = features
        self.condition_dim = condition_dim
        self.blocks = nn.ModuleList(
            ResidualBlock(features, hidden, depth, condition_dim) for _ in range(blocks)
        )

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Apply the blocks in turn.

        Args:
            x: inputs ``[B, *event]`` with ``features`` elements per row.
            c: conditions ``[B, condition_dim]``; required exactly when ``condition_dim > 0``.

        Returns:
            Outputs shaped like ``x``.
        """
        if (c is None) != (self.condition_dim == 0):
            raise ValueError(
                "ResNet built with condition_dim="
                f"{self.condition_dim} but c is {'missing' if c is None else 'given'}"
            )
        h = x.reshape(x.shape[0], -1)
        if h.shape[1] != self.features:
            raise ValueError(f"ResNet expects {self.features} features, got {h.shape[1]}")
        for block in self.blocks:
            h = block(h, c)
        return h.reshape(x.shape)
