r"""Feature-wise z-scoring as an exact affine bijection.

.. math:: T(v) = (v - \mu) \oslash \sigma, \qquad T^{-1}(u) = u \odot \sigma + \mu, \qquad
   \log\lvert\det J_T\rvert = -\textstyle\sum_j \log \sigma_j ,

with :math:`\mu, \sigma` the mean and standard deviation of a fitting set. A feature whose
standard deviation is below ``min_std`` (a constant feature) gets :math:`\sigma_j = 1`, so it is
only centred instead of blown up. :class:`~freeflows.standardized.StandardizedModel` turns a
model of z-scored data into one of the data in its own units.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Transform


class Standardizer(Transform):
    r"""The z-score :math:`T(v) = (v - \mu)/\sigma` of vectors ``[*batch, D]``, invertible and exact.

    Args:
        mean: :math:`\mu`, shape ``[D]``.
        std: :math:`\sigma`, shape ``[D]``, all positive.

    Example:
        >>> import torch
        >>> from freeflows.transforms import Standardizer
        >>> t = Standardizer(torch.tensor([1.0, -2.0]), torch.tensor([2.0, 4.0]))
        >>> z, log_det = t(torch.tensor([[3.0, -2.0]]))
        >>> z, log_det  # -log 2 - log 4
        (tensor([[1., 0.]]), tensor([-2.0794]))
        >>> t.inverse(z)
        tensor([[ 3., -2.]])
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        if mean.dim() != 1 or mean.shape != std.shape:
            raise ValueError(
                f"mean and std must both have shape [D], got {tuple(mean.shape)} and {tuple(std.shape)}"
            )
        if not bool((std > 0).all()):
            raise ValueError("std must be positive")
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    @classmethod
    def fit(cls, v: Tensor, min_std: float = 1e-6) -> Standardizer:
        """Mean and (unbiased) standard deviation of the rows of ``v [N, D]``; ``std < min_std`` -> 1.

        Args:
            v: the fitting set ``[N >= 2, D]``.
            min_std: a smaller standard deviation (a constant feature) becomes 1.

        Returns:
            The fitted :class:`Standardizer`.

        Example:
            >>> import torch
            >>> from freeflows.transforms import Standardizer
            >>> Standardizer.fit(torch.tensor([[0.0, 5.0], [2.0, 5.0]])).std
            tensor([1.4142, 1.0000])
        """
        if v.dim() != 2 or v.shape[0] < 2:
            raise ValueError(f"fit needs data of shape [N >= 2, D], got {tuple(v.shape)}")
        std = v.std(dim=0)
        std = torch.where(std < min_std, torch.ones_like(std), std)
        return cls(v.mean(dim=0), std)

    @property
    def dim(self) -> int:
        """:math:`D`, the number of features."""
        return self.mean.shape[0]

    def forward(self, v: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r""":math:`T(v) = (v - \mu)/\sigma` and its log-determinant.

        Args:
            v: vectors ``[*batch, D]``.
            c: ignored.

        Returns:
            ``(T(v), log_det)``, ``[*batch, D]`` and ``[*batch]`` (the same value everywhere).
        """
        self._check(v)
        z = (v - self.mean.to(v)) / self.std.to(v)
        return z, self.log_abs_det().to(v).expand(v.shape[:-1])

    def inverse(self, u: Tensor, c: Tensor | None = None) -> Tensor:
        r""":math:`T^{-1}(u) = u\,\sigma + \mu`.

        Args:
            u: vectors ``[*batch, D]``.
            c: ignored.

        Returns:
            ``[*batch, D]``.
        """
        self._check(u)
        return u * self.std.to(u) + self.mean.to(u)

    def log_abs_det(self) -> Tensor:
        r""":math:`\log\lvert\det J_T\rvert = -\sum_j \log\sigma_j`, a scalar (the same for every ``v``).

        Returns:
            A 0-dim tensor.
        """
        return -self.std.log().sum()

    def _check(self, v: Tensor) -> None:
        if v.dim() < 1 or v.shape[-1] != self.dim:
            raise ValueError(f"Standardizer of {self.dim} features got input of shape {tuple(v.shape)}")

    def extra_repr(self) -> str:
        """The number of features, shown by ``repr``."""
        return f"dim={self.dim}"
