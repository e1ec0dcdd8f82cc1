r"""Exact bijections and how they compose.

Direction convention (the library's, see :mod:`freeflows.contract`): **forward maps data to
latent** and returns the log-determinant of that map,

.. math:: z, \log\lvert\det \partial z / \partial x\rvert = T(x, c),

so that a flow's density is :math:`\log p(x \mid c) = \log p_Z(z) + \log\lvert\det \partial z /
\partial x\rvert`. **Inverse maps latent to data**, :math:`x = T^{-1}(z, c)`, and is what sampling
uses. Conditions ``c`` reach transforms already checked and broadcast to ``[B, C]`` (see
:func:`freeflows.checks.check_condition`), or ``None``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class Transform(nn.Module):
    r"""An invertible map with a tractable log-determinant.

    Subclasses implement ``forward(x, c) -> (z, log_det)`` with ``log_det`` of shape ``[B]``
    (data to latent) and ``inverse(z, c) -> x`` (latent to data).
    """

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class ComposedTransform(Transform):
    r"""The composition :math:`T = T_n \circ \dots \circ T_1` (``T_1`` is applied first to the data).

    .. math:: \log\lvert\det J_T(x)\rvert = \sum_k \log\lvert\det J_{T_k}(x_{k-1})\rvert,
       \qquad x_0 = x,\ x_k = T_k(x_{k-1}).
    """

    def __init__(self, *transforms: Transform):
        super().__init__()
        if (
            len(transforms) == 1
            and isinstance(transforms[0], Iterable)
            and not isinstance(transforms[0], nn.Module)
        ):
            transforms = tuple(transforms[0])
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x, c)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        for t in reversed(self.transforms):
            z = t.inverse(z, c)
        return z

    def __len__(self) -> int:
        return len(self.transforms)


class Permutation(Transform):
    r"""A fixed permutation of axis 1 (the features of vectors, the channels of images):
    :math:`z_i = x_{\pi(i)}`, with :math:`\log\lvert\det\rvert = 0`."""

    def __init__(self, permutation: Tensor):
        super().__init__()
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        n = permutation.numel()
        if permutation.dim() != 1 or not torch.equal(permutation.sort().values, torch.arange(n)):
            raise ValueError(f"not a permutation of 0..{n - 1}: {permutation.tolist()}")
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.permutation.numel():
            raise ValueError(
                f"Permutation of {self.permutation.numel()} features got input of shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        return x[:, self.permutation], x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        self._check(z)
        return z[:, self.inverse_permutation]


class Reverse(Permutation):
    """Reverse the order of the ``features`` entries of axis 1."""

    def __init__(self, features: int):
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        super().__init__(torch.arange(features - 1, -1, -1))


def check_features(x: Tensor, features: int, name: str) -> None:
    """Raise :class:`ValueError` unless ``x`` is ``[B, features]``."""
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(f"{name} expects vectors of shape [batch, {features}], got {tuple(x.shape)}")


def check_image(x: Tensor, channels: int, name: str) -> None:
    """Raise :class:`ValueError` unless ``x`` is ``[B, channels, H, W]``."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(
            f"{name} expects images of shape [batch, {channels}, height, width], got {tuple(x.shape)}"
        )
