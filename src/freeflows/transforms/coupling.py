r"""Coupling transforms on vectors: NICE (additive) and RealNVP (affine).

A boolean ``mask`` of length :math:`D` splits :math:`x` into a part :math:`x_a` (``mask`` true)
that passes through unchanged and conditions the transform of the other part :math:`x_b`:

* additive (NICE): :math:`z_a = x_a`, :math:`z_b = x_b + t(x_a, c)`, :math:`\log\lvert\det\rvert = 0`;
* affine (RealNVP): :math:`z_b = x_b \odot e^{s(x_a, c)} + t(x_a, c)`,
  :math:`\log\lvert\det\rvert = \sum_j s_j`.

The Jacobian is block-triangular, so its determinant is the product of the diagonal of the
:math:`x_b` block. Stacks alternate the mask (see :func:`half_mask`) so that every feature gets
transformed. The affine log-scale is soft-clamped, :math:`s = \kappa \tanh(\tilde s / \kappa)`,
so that :math:`|s| < \kappa` and neither direction can overflow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Transform, check_features
from .conditioner import MLP


def half_mask(features: int, flip: bool = False) -> Tensor:
    """The mask whose first ``features // 2`` entries pass through (the other
    ``features - features // 2`` are transformed); ``flip`` swaps the two parts."""
    if features < 2:
        raise ValueError(f"a coupling needs at least 2 features, got {features}")
    mask = torch.arange(features) < features // 2
    return ~mask if flip else mask


def soft_clamp(s: Tensor, bound: float | None) -> Tensor:
    r""":math:`\kappa \tanh(s / \kappa)`: close to ``s`` near 0, always inside
    :math:`(-\kappa, \kappa)`."""
    return s if bound is None else bound * torch.tanh(s / bound)


class Coupling(Transform):
    """Shared bookkeeping: the ``mask`` split, the conditioner network and reassembly."""

    def __init__(
        self,
        features: int,
        mask: Tensor | None,
        params_per_feature: int,
        hidden: int,
        layers: int,
        condition_dim: int | None,
    ):
        super().__init__()
        mask = half_mask(features) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() != 1 or mask.numel() != features:
            raise ValueError(
                f"the coupling mask has shape {tuple(mask.shape)}, but there are {features} features"
            )
        n_a = int(mask.sum())
        if n_a == 0 or n_a == features:
            raise ValueError("the coupling mask must have both true (kept) and false (transformed) entries")
        self.features = features
        self.register_buffer("mask", mask)
        self.register_buffer("index_a", mask.nonzero().flatten())
        self.register_buffer("index_b", (~mask).nonzero().flatten())
        self.register_buffer("unsplit", torch.argsort(torch.cat([self.index_a, self.index_b])))
        self.n_b = features - n_a
        self.params_per_feature = params_per_feature
        self.net = MLP(n_a, params_per_feature * self.n_b, hidden, layers, condition_dim)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_features(x, self.features, type(self).__name__)
        return x[:, self.index_a], x[:, self.index_b]

    def join(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], dim=1)[:, self.unsplit]

    def params(self, a: Tensor, c: Tensor | None) -> Tensor:
        """Conditioner output ``[B, params_per_feature, n_b]``."""
        return self.net(a, c).reshape(a.shape[0], self.params_per_feature, self.n_b)


class AdditiveCoupling(Coupling):
    r"""NICE's additive coupling, :math:`z_b = x_b + t(x_a, c)` (volume preserving)."""

    def __init__(
        self,
        features: int,
        mask: Tensor | None = None,
        hidden: int = 64,
        layers: int = 2,
        condition_dim: int | None = None,
    ):
        super().__init__(features, mask, 1, hidden, layers, condition_dim)

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a, b = self.split(x)
        t = self.params(a, c)[:, 0]
        return self.join(a, b + t), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        a, b = self.split(z)
        return self.join(a, b - self.params(a, c)[:, 0])


class AffineCoupling(Coupling):
    r"""RealNVP's affine coupling, :math:`z_b = x_b \odot e^{s} + t` with
    :math:`s = \kappa\tanh(\tilde s(x_a, c)/\kappa)` (``clamp`` :math:`=\kappa`; ``None`` for no clamp).
    """

    def __init__(
        self,
        features: int,
        mask: Tensor | None = None,
        hidden: int = 64,
        layers: int = 2,
        condition_dim: int | None = None,
        clamp: float | None = 3.0,
    ):
        super().__init__(features, mask, 2, hidden, layers, condition_dim)
        if clamp is not None and not clamp > 0:
            raise ValueError(f"clamp must be positive or None, got {clamp}")
        self.clamp = clamp

    def _scale_shift(self, a: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        p = self.params(a, c)
        return soft_clamp(p[:, 0], self.clamp), p[:, 1]

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a, b = self.split(x)
        s, t = self._scale_shift(a, c)
        return self.join(a, b * torch.exp(s) + t), s.sum(dim=1)

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        a, b = self.split(z)
        s, t = self._scale_shift(a, c)
        return self.join(a, (b - t) * torch.exp(-s))


class DiagonalScaling(Transform):
    r"""NICE's last layer, a learned diagonal scaling :math:`z = x \odot e^{s}`,
    :math:`\log\lvert\det\rvert = \sum_i s_i`. It is what lets NICE's otherwise volume-preserving
    stack change volume."""

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self.log_scale = nn.Parameter(torch.zeros(features))

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features, "DiagonalScaling")
        return x * torch.exp(self.log_scale), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        check_features(z, self.features, "DiagonalScaling")
        return z * torch.exp(-self.log_scale)
