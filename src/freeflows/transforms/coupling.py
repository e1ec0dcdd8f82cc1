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
    """The coupling mask whose first ``features // 2`` entries pass through (the other
    ``features - features // 2`` are transformed).

    Args:
        features: ``D >= 2``.
        flip: swap the two parts (stacks alternate it, so that every feature is transformed).

    Returns:
        A boolean mask ``[D]``, true where a feature passes through.

    Example:
        >>> from freeflows.transforms import half_mask
        >>> half_mask(5)
        tensor([ True,  True, False, False, False])
        >>> half_mask(5, flip=True)
        tensor([False, False,  True,  True,  True])
    """
    if features < 2:
        raise ValueError(f"a coupling needs at least 2 features, got {features}")
    mask = torch.arange(features) < features // 2
    return ~mask if flip else mask


def soft_clamp(s: Tensor, bound: float | None) -> Tensor:
    r"""Soft clamp :math:`\kappa \tanh(s / \kappa)`: close to ``s`` near 0, always inside
    :math:`(-\kappa, \kappa)`, and smooth (unlike a hard clamp, its gradient never vanishes
    abruptly).

    Args:
        s: the raw log-scales.
        bound: :math:`\kappa > 0`, or ``None`` to return ``s`` unchanged.

    Example:
        >>> import torch
        >>> from freeflows.transforms.coupling import soft_clamp
        >>> soft_clamp(torch.tensor([0.0, 100.0]), 3.0)
        tensor([0., 3.])
    """
    return s if bound is None else bound * torch.tanh(s / bound)


class Coupling(Transform):
    """Shared bookkeeping of the vector couplings: the ``mask`` split, the conditioner network
    and the reassembly. Subclasses implement ``forward`` and ``inverse``.

    The conditioner is an :class:`~freeflows.transforms.conditioner.MLP` from :math:`x_a` (and
    ``c``) to ``params_per_feature`` numbers per transformed feature; its last layer starts at
    zero, so a coupling starts as the identity.

    Args:
        features: ``D >= 2``.
        mask: boolean ``[D]``, true for the features :math:`x_a` that pass through; ``None`` for
            :func:`half_mask`.
        params_per_feature: conditioner outputs per transformed feature (1 for a shift, 2 for a
            scale and a shift).
        hidden: width of the conditioner's hidden layers.
        layers: number of the conditioner's hidden layers.
        condition_dim: features of the condition ``c``, or ``None``.

    Example:
        >>> import torch
        >>> from freeflows.transforms import AdditiveCoupling
        >>> t = AdditiveCoupling(4)  # a Coupling
        >>> a, b = t.split(torch.arange(4.0)[None])
        >>> a, b
        (tensor([[0., 1.]]), tensor([[2., 3.]]))
        >>> t.join(a, b)
        tensor([[0., 1., 2., 3.]])
    """

    def __init__(
        self,
        features: int,
        mask: Tensor | None,
        params_per_feature: int,
        hidden: int,
        layers: int,
        condition_dim: int | None,
    ) -> None:
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
        """Split vectors into the part that passes through and the part that is transformed.

        Args:
            x: vectors ``[B, D]``.

        Returns:
            ``(x_a, x_b)``, ``[B, D - n_b]`` and ``[B, n_b]``, each in feature order.
        """
        check_features(x, self.features, type(self).__name__)
        return x[:, self.index_a], x[:, self.index_b]

    def join(self, a: Tensor, b: Tensor) -> Tensor:
        """Reassemble vectors from the two parts, the inverse of :meth:`split`.

        Args:
            a: the part that passes through, ``[B, D - n_b]``.
            b: the transformed part, ``[B, n_b]``.

        Returns:
            Vectors ``[B, D]``.
        """
        return torch.cat([a, b], dim=1)[:, self.unsplit]

    def params(self, a: Tensor, c: Tensor | None) -> Tensor:
        """The conditioner's output for the part that passes through.

        Args:
            a: :math:`x_a`, ``[B, D - n_b]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``[B, params_per_feature, n_b]``.
        """
        return self.net(a, c).reshape(a.shape[0], self.params_per_feature, self.n_b)


class AdditiveCoupling(Coupling):
    r"""NICE's additive coupling, volume preserving:

    .. math:: z_a = x_a, \qquad z_b = x_b + t(x_a, c), \qquad \log\lvert\det J\rvert = 0 .

    Args:
        features: ``D >= 2``.
        mask: boolean ``[D]``, true for the features :math:`x_a` that pass through; ``None`` for
            :func:`half_mask`.
        hidden: width of the conditioner's hidden layers.
        layers: number of the conditioner's hidden layers.
        condition_dim: features of the condition ``c``, or ``None``.

    References:
        Dinh, Krueger and Bengio, "NICE: Non-linear Independent Components Estimation" (2014),
        arXiv:1410.8516.

    Example:
        >>> import torch
        >>> from freeflows.transforms import AdditiveCoupling
        >>> t = AdditiveCoupling(4, condition_dim=2)
        >>> x, c = torch.randn(8, 4), torch.randn(8, 2)
        >>> z, log_det = t(x, c)
        >>> bool((log_det == 0).all()), torch.allclose(t.inverse(z, c), x)
        (True, True)
    """

    def __init__(
        self,
        features: int,
        mask: Tensor | None = None,
        hidden: int = 64,
        layers: int = 2,
        condition_dim: int | None = None,
    ) -> None:
        super().__init__(features, mask, 1, hidden, layers, condition_dim)

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to latent, :math:`z_b = x_b + t(x_a, c)`.

        Args:
            x: data ``[B, D]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``(z, zeros)``, ``[B, D]`` and ``[B]``.
        """
        a, b = self.split(x)
        t = self.params(a, c)[:, 0]
        return self.join(a, b + t), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """Latent to data, :math:`x_b = z_b - t(z_a, c)`.

        Args:
            z: latent points ``[B, D]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            The data points ``[B, D]``.
        """
        a, b = self.split(z)
        return self.join(a, b - self.params(a, c)[:, 0])


class AffineCoupling(Coupling):
    r"""RealNVP's affine coupling:

    .. math:: z_a = x_a, \qquad z_b = x_b \odot e^{s} + t, \qquad
       \log\lvert\det J\rvert = \textstyle\sum_j s_j,

    with :math:`(\tilde s, t) = \mathrm{MLP}(x_a, c)` and :math:`s = \kappa\tanh(\tilde s/\kappa)`.

    Args:
        features: ``D >= 2``.
        mask: boolean ``[D]``, true for the features :math:`x_a` that pass through; ``None`` for
            :func:`half_mask`.
        hidden: width of the conditioner's hidden layers.
        layers: number of the conditioner's hidden layers.
        condition_dim: features of the condition ``c``, or ``None``.
        clamp: :math:`\kappa > 0`, the bound of the log-scale; ``None`` for no clamp.

    References:
        Dinh, Sohl-Dickstein and Bengio, "Density estimation using Real NVP" (2016),
        arXiv:1605.08803.

    Example:
        >>> import torch
        >>> from freeflows.transforms import AffineCoupling, half_mask
        >>> t = AffineCoupling(4, half_mask(4, flip=True))
        >>> x = torch.randn(8, 4)
        >>> z, log_det = t(x)
        >>> z.shape, log_det.shape, torch.allclose(t.inverse(z), x, atol=1e-6)
        (torch.Size([8, 4]), torch.Size([8]), True)
    """

    def __init__(
        self,
        features: int,
        mask: Tensor | None = None,
        hidden: int = 64,
        layers: int = 2,
        condition_dim: int | None = None,
        clamp: float | None = 3.0,
    ) -> None:
        super().__init__(features, mask, 2, hidden, layers, condition_dim)
        if clamp is not None and not clamp > 0:
            raise ValueError(f"clamp must be positive or None, got {clamp}")
        self.clamp = clamp

    def _scale_shift(self, a: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        p = self.params(a, c)
        return soft_clamp(p[:, 0], self.clamp), p[:, 1]

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Data to latent, :math:`z_b = x_b \odot e^{s(x_a, c)} + t(x_a, c)`.

        Args:
            x: data ``[B, D]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``(z, log_det)`` with :math:`\log\lvert\det J\rvert = \sum_j s_j`, ``[B, D]`` and ``[B]``.
        """
        a, b = self.split(x)
        s, t = self._scale_shift(a, c)
        return self.join(a, b * torch.exp(s) + t), s.sum(dim=1)

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        r"""Latent to data, :math:`x_b = (z_b - t(z_a, c)) \odot e^{-s(z_a, c)}`.

        Args:
            z: latent points ``[B, D]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            The data points ``[B, D]``.
        """
        a, b = self.split(z)
        s, t = self._scale_shift(a, c)
        return self.join(a, (b - t) * torch.exp(-s))


class DiagonalScaling(Transform):
    r"""NICE's last layer, a learned diagonal scaling:

    .. math:: z = x \odot e^{s}, \qquad \log\lvert\det J\rvert = \textstyle\sum_i s_i .

    It is what lets NICE's otherwise volume-preserving stack change volume. The log-scales
    :math:`s` start at zero.

    Args:
        features: ``D``.

    References:
        Dinh, Krueger and Bengio, "NICE: Non-linear Independent Components Estimation" (2014),
        arXiv:1410.8516.

    Example:
        >>> import torch
        >>> from freeflows.transforms import DiagonalScaling
        >>> t = DiagonalScaling(2)
        >>> with torch.no_grad():
        ...     _ = t.log_scale.fill_(1.0)
        >>> z, log_det = t(torch.ones(1, 2))
        >>> torch.allclose(z, torch.full((1, 2), 2.71828)), log_det.tolist()  # e^1 and s_1 + s_2
        (True, [2.0])
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.log_scale = nn.Parameter(torch.zeros(features))

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Data to latent, :math:`z = x \odot e^{s}`.

        Args:
            x: data ``[B, D]``.
            c: ignored.

        Returns:
            ``(z, log_det)``, ``[B, D]`` and ``[B]``.
        """
        check_features(x, self.features, "DiagonalScaling")
        return x * torch.exp(self.log_scale), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        r"""Latent to data, :math:`x = z \odot e^{-s}`.

        Args:
            z: latent points ``[B, D]``.
            c: ignored.

        Returns:
            The data points ``[B, D]``.
        """
        check_features(z, self.features, "DiagonalScaling")
        return z * torch.exp(-self.log_scale)
