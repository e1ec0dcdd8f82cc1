r"""A time-dependent MLP velocity field for continuous normalizing flows.

.. math:: h_0 = x, \qquad h_{k+1} = \sigma\big(W_k [h_k, t, c] + b_k\big), \qquad
   f(t, x, c) = W_{\text{out}} [h_L, t, c] + b_{\text{out}}

Time :math:`t` (and the condition :math:`c`, if any) is concatenated to the input of **every**
layer, so each layer's pre-activation is an affine function of :math:`t`. The activation
:math:`\sigma` is smooth (``tanh``, ``silu`` or ``softplus``): a CNF differentiates the field once
for the trace and once more for training, and adaptive solvers take fewer steps on smooth fields.

With ``zero_init=True`` (default) the output layer starts at zero, so the flow starts as the
identity map and the first solves are cheap; its gradient is not zero, so it trains.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ACTIVATIONS = {"tanh": nn.Tanh, "silu": nn.SiLU, "softplus": nn.Softplus}


class TimeMLP(nn.Module):
    r"""Velocity :math:`f(t, x, c)` of a continuous normalizing flow, an MLP with time and
    condition fed to every layer (see the module docstring): ``[B, features] -> [B, features]``
    (any event shape with ``features`` elements is flattened and restored). It is the field that
    ``CNF(features)`` builds.

    Args:
        features: number of elements of ``x``.
        hidden: width of the hidden layers.
        layers: number of hidden layers (``>= 1``).
        condition_dim: number of condition features; ``0`` for an unconditional field.
        activation: ``"tanh"``, ``"silu"`` or ``"softplus"``.
        zero_init: start the output layer at zero (the field is then :math:`f \equiv 0`).

    References:
        Grathwohl, Chen, Bettencourt, Sutskever and Duvenaud, "FFJORD: Free-form Continuous
        Dynamics for Scalable Reversible Generative Models" (2018), arXiv:1810.01367.

    Example:
        >>> import torch
        >>> from freeflows.nets import TimeMLP
        >>> f = TimeMLP(2, hidden=16, condition_dim=1, zero_init=False)
        >>> x, c = torch.randn(5, 2), torch.randn(5, 1)
        >>> f(0.3, x, c).shape, f(torch.full((5,), 0.3), x, c).shape
        (torch.Size([5, 2]), torch.Size([5, 2]))
    """

    def __init__(
        self,
        features: int,
        hidden: int = 64,
        layers: int = 3,
        condition_dim: int = 0,
        activation: str = "tanh",
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("features", features), ("hidden", hidden), ("layers", layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(condition_dim, int) or condition_dim < 0:
            raise ValueError(f"condition_dim must be an integer >= 0, got {condition_dim!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.features = features
        self.condition_dim = condition_dim
        extra = 1 + condition_dim
        widths = [features] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(w + extra, hidden) for w in widths[:-1])
        self.activation = ACTIVATIONS[activation]()
        self.out = nn.Linear(hidden + extra, features)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, t: Tensor | float, x: Tensor, c: Tensor | None = None) -> Tensor:
        """The velocity at time ``t``.

        Args:
            t: a float, a scalar tensor, or one time per row ``[B]``.
            x: states ``[B, *event]`` with ``features`` elements per row.
            c: conditions ``[B, condition_dim]``; required exactly when ``condition_dim > 0``.

        Returns:
            :math:`f(t, x, c)`, shaped like ``x``.
        """
        if (c is None) != (self.condition_dim == 0):
            raise ValueError(
                f"TimeMLP built with condition_dim={self.condition_dim} but c is "
                f"{'missing' if c is None else 'given'}"
            )
        h = x.reshape(x.shape[0], -1)
        if h.shape[1] != self.features:
            raise ValueError(f"TimeMLP expects {self.features} features, got {h.shape[1]}")
        t = torch.as_tensor(t, dtype=h.dtype, device=h.device).reshape(-1, 1).expand(h.shape[0], 1)
        extra = t if c is None else torch.cat([t, c.to(h)], dim=-1)
        for layer in self.hidden:
            h = self.activation(layer(torch.cat([h, extra], dim=-1)))
        return self.out(torch.cat([h, extra], dim=-1)).reshape(x.shape)

    def extra_repr(self) -> str:
        """The sizes shown by ``repr``."""
        return f"features={self.features}, condition_dim={self.condition_dim}"
