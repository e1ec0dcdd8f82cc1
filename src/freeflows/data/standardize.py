r"""Feature-wise z-scoring as an exact affine bijection.

.. math:: T(v) = (v - \mu) \oslash \sigma, \qquad T^{-1}(u) = u \odot \sigma + \mu, \qquad
   \log\lvert\det J_T\rvert = -\textstyle\sum_j \log \sigma_j ,

with :math:`\mu, \sigma` the mean and standard deviation of a fitting set. A feature whose
standard deviation is below ``min_std`` (a constant feature) gets :math:`\sigma_j = 1`, so it is
only centred instead of blown up.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Standardizer(nn.Module):
    r"""The z-score :math:`T(v) = (v - \mu)/\sigma` of vectors ``[N, D]``, invertible and exact.

    Args:
        mean: :math:`\mu`, shape ``[D]``.
        std: :math:`\sigma`, shape ``[D]``, all positive.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor):
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
        """Mean and (unbiased) standard deviation of the rows of ``v [N, D]``; ``std < min_std`` -> 1."""
        if v.dim() != 2 or v.shape[0] < 2:
            raise ValueError(f"fit needs data of shape [N >= 2, D], got {tuple(v.shape)}")
        std = v.std(dim=0)
        std = torch.where(std < min_std, torch.ones_like(std), std)
        return cls(v.mean(dim=0), std)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def forward(self, v: Tensor) -> Tensor:
        r""":math:`T(v) = (v - \mu)/\sigma`."""
        return (v - self.mean.to(v)) / self.std.to(v)

    def inverse(self, u: Tensor) -> Tensor:
        r""":math:`T^{-1}(u) = u\,\sigma + \mu`."""
        return u * self.std.to(u) + self.mean.to(u)

    def log_abs_det(self) -> Tensor:
        r""":math:`\log\lvert\det J_T\rvert = -\sum_j \log\sigma_j`, a scalar (the same for every ``v``)."""
        return -self.std.log().sum()

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
