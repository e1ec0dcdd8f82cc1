r"""Exact bijections from a prior's support onto :math:`\mathbb{R}^D`, for bounded priors in SBI.

Many sbibm tasks have a uniform prior on a box, or a log-normal one on the positive orthant, so
the posterior is zero outside that support. A flow with a Gaussian latent knows no support: it
puts some mass outside, and its density has to fall steeply at the edges. Learning
:math:`u = T(\theta)` instead puts every draw :math:`T^{-1}(u)` inside. For a box
:math:`(a, b)^D` (:class:`BoxLogit`)

.. math:: T(\theta)_j = \operatorname{logit}\frac{\theta_j - a_j}{b_j - a_j},
   \qquad T^{-1}(u)_j = a_j + (b_j - a_j)\,\sigma(u_j),

with :math:`\log\lvert\det J_T(\theta)\rvert = \sum_j \log\frac{b_j - a_j}{(\theta_j -
a_j)(b_j - \theta_j)}`; for the positive orthant (:class:`PositiveLog`) :math:`T(\theta) =
\log\theta` with :math:`\log\lvert\det J_T\rvert = -\sum_j \log\theta_j`. Densities follow by the
change of variables, :math:`\log p_\theta(\theta) = \log p_u(T(\theta)) + \log\lvert\det
J_T(\theta)\rvert`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Transform


class BoxLogit(Transform):
    r"""The map :math:`T(\theta) = \operatorname{logit}((\theta - a)/(b - a))` of vectors ``[*batch, D]``.

    Args:
        low: :math:`a`, shape ``[D]``.
        high: :math:`b`, shape ``[D]``, every entry greater than ``low``'s.
        eps: :meth:`forward` clamps :math:`(\theta - a)/(b - a)` to ``[eps, 1 - eps]``, so a
            :math:`\theta` on the box's edge (a uniform draw can land there) maps to a finite
            value. Inside that margin the map is exact.

    Example:
        >>> import torch
        >>> from freeflows.transforms import BoxLogit
        >>> t = BoxLogit(torch.tensor([0.0]), torch.tensor([4.0]))
        >>> u, log_det = t(torch.tensor([[1.0]]))  # a quarter of the way: logit(1/4)
        >>> u, log_det  # log(4 / (1 * 3))
        (tensor([[-1.0986]]), tensor([0.2877]))
        >>> torch.allclose(t.inverse(u), torch.tensor([[1.0]]))
        True
    """

    low: Tensor
    high: Tensor

    def __init__(self, low: Tensor, high: Tensor, eps: float = 1e-6) -> None:
        super().__init__()
        low, high = torch.as_tensor(low), torch.as_tensor(high)
        if low.dim() != 1 or low.shape != high.shape:
            raise ValueError(
                f"low and high must both have shape [D], got {tuple(low.shape)} and {tuple(high.shape)}"
            )
        if not bool((high > low).all()):
            raise ValueError("every entry of high must be greater than low's")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.register_buffer("low", low.detach().clone())
        self.register_buffer("high", high.detach().clone())
        self.eps = eps

    @property
    def dim(self) -> int:
        """:math:`D`, the number of features."""
        return self.low.shape[0]

    def _unit(self, theta: Tensor) -> Tensor:
        low, high = self.low.to(theta), self.high.to(theta)
        return ((theta - low) / (high - low)).clamp(self.eps, 1.0 - self.eps)

    def forward(self, theta: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r""":math:`T(\theta)` and :math:`\log\lvert\det J_T(\theta)\rvert`.

        Args:
            theta: points of the box ``[*batch, D]``.
            c: ignored.

        Returns:
            ``(u, log_det)``, ``[*batch, D]`` and ``[*batch]``.
        """
        return torch.logit(self._unit(theta)), self.log_abs_det(theta)

    def inverse(self, u: Tensor, c: Tensor | None = None) -> Tensor:
        r""":math:`T^{-1}(u) = a + (b - a)\,\sigma(u)`, inside the closed box for every finite ``u``.

        Args:
            u: ``[*batch, D]``.
            c: ignored.

        Returns:
            ``[*batch, D]``.
        """
        low, high = self.low.to(u), self.high.to(u)
        return low + (high - low) * torch.sigmoid(u)

    def log_abs_det(self, theta: Tensor) -> Tensor:
        r""":math:`\log\lvert\det J_T(\theta)\rvert`, shape ``[N]``.

        With :math:`s = (\theta - a)/(b - a)`, :math:`\partial T_j/\partial\theta_j =
        1/((b_j - a_j)\,s_j(1 - s_j))`.

        Args:
            theta: points of the box ``[*batch, D]``.

        Returns:
            ``[*batch]``.
        """
        s = self._unit(theta)
        width = (self.high - self.low).to(theta)
        return -(width.log() + s.log() + torch.log1p(-s)).sum(dim=-1)

    def extra_repr(self) -> str:
        """The number of features, shown by ``repr``."""
        return f"dim={self.dim}"


class PositiveLog(Transform):
    r"""The map :math:`T(\theta) = \log\theta` of positive vectors ``[*batch, D]``.

    Args:
        dim: :math:`D`.
        tiny: :meth:`forward` clamps :math:`\theta` below at ``tiny``, so that a zero maps to a
            finite value.

    Example:
        >>> import torch
        >>> from freeflows.transforms import PositiveLog
        >>> u, log_det = PositiveLog(2)(torch.tensor([[1.0, 2.0]]))
        >>> u, log_det
        (tensor([[0.0000, 0.6931]]), tensor([-0.6931]))
    """

    def __init__(self, dim: int, tiny: float = 1e-30) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if not tiny > 0.0:
            raise ValueError(f"tiny must be positive, got {tiny}")
        self._dim = dim
        self.tiny = tiny

    @property
    def dim(self) -> int:
        """:math:`D`, the number of features."""
        return self._dim

    def forward(self, theta: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r""":math:`T(\theta) = \log\theta` and :math:`-\sum_j \log\theta_j`.

        Args:
            theta: positive vectors ``[*batch, D]``.
            c: ignored.

        Returns:
            ``(u, log_det)``, ``[*batch, D]`` and ``[*batch]``.
        """
        u = theta.clamp_min(self.tiny).log()
        return u, -u.sum(dim=-1)

    def inverse(self, u: Tensor, c: Tensor | None = None) -> Tensor:
        r""":math:`T^{-1}(u) = e^u`.

        Args:
            u: ``[*batch, D]``.
            c: ignored.

        Returns:
            ``[*batch, D]``.
        """
        return u.exp()

    def log_abs_det(self, theta: Tensor) -> Tensor:
        r""":math:`\log\lvert\det J_T(\theta)\rvert = -\sum_j \log\theta_j`, shape ``[*batch]``.

        Args:
            theta: positive vectors ``[*batch, D]``.

        Returns:
            ``[*batch]``.
        """
        return -theta.clamp_min(self.tiny).log().sum(dim=-1)

    def extra_repr(self) -> str:
        """The number of features, shown by ``repr``."""
        return f"dim={self.dim}"
