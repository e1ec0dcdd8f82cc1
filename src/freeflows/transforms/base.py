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
    r"""An invertible map with a tractable log-determinant, the base of every exact bijection.

    Subclasses implement ``forward(x, c) -> (z, log_det)``, data to latent, with
    :math:`\log\lvert\det \partial z/\partial x\rvert` of shape ``[B]``, and
    ``inverse(z, c) -> x``, latent to data. A :class:`~freeflows.flows.Flow` composes one with a
    latent distribution.

    Example:
        >>> import torch
        >>> from freeflows.transforms import Transform
        >>> class Shift(Transform):
        ...     def forward(self, x, c=None):
        ...         return x + 1, x.new_zeros(x.shape[0])
        ...     def inverse(self, z, c=None):
        ...         return z - 1
        >>> z, log_det = Shift()(torch.zeros(2, 3))
        >>> z.shape, log_det.shape
        (torch.Size([2, 3]), torch.Size([2]))
    """

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        r"""Map data to latent.

        Args:
            x: data ``[B, *event]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``(z, log_det)``: the latent ``[B, *event]`` and
            :math:`\log\lvert\det \partial z/\partial x\rvert`, ``[B]``.
        """
        raise NotImplementedError

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:  # pragma: no cover
        """Map latent to data.

        Args:
            z: latent points ``[B, *event]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            The data point ``x`` with ``forward(x, c)[0] == z``, ``[B, *event]``.
        """
        raise NotImplementedError


class ComposedTransform(Transform):
    r"""The composition :math:`T = T_n \circ \dots \circ T_1` (``T_1`` is applied first to the data).

    .. math:: \log\lvert\det J_T(x)\rvert = \sum_k \log\lvert\det J_{T_k}(x_{k-1})\rvert,
       \qquad x_0 = x,\ x_k = T_k(x_{k-1}).

    Every step receives the same condition ``c``.

    Args:
        transforms: the steps :math:`T_1, \dots, T_n`, as arguments or as one iterable.

    Example:
        >>> import torch
        >>> from freeflows.transforms import ComposedTransform, DiagonalScaling, Reverse
        >>> t = ComposedTransform(DiagonalScaling(3), Reverse(3))
        >>> x = torch.randn(4, 3)
        >>> z, log_det = t(x)
        >>> z.shape, log_det.shape, len(t)
        (torch.Size([4, 3]), torch.Size([4]), 2)
        >>> torch.allclose(t.inverse(z), x)
        True
    """

    def __init__(self, *transforms: Transform) -> None:
        super().__init__()
        if (
            len(transforms) == 1
            and isinstance(transforms[0], Iterable)
            and not isinstance(transforms[0], nn.Module)
        ):
            transforms = tuple(transforms[0])
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Apply :math:`T_1, \dots, T_n` in turn and sum their log-determinants.

        Args:
            x: data ``[B, *event]``.
            c: conditions ``[B, C]``, or ``None``; every step receives them.

        Returns:
            ``(z, log_det)``, ``[B, *event]`` and ``[B]``.
        """
        log_det = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x, c)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        r"""Apply the inverses :math:`T_n^{-1}, \dots, T_1^{-1}` in turn.

        Args:
            z: latent points ``[B, *event]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            The data points ``[B, *event]``.
        """
        for t in reversed(self.transforms):
            z = t.inverse(z, c)
        return z

    def __len__(self) -> int:
        """The number of steps."""
        return len(self.transforms)


class Permutation(Transform):
    r"""A fixed permutation of axis 1 (the features of vectors, the channels of images).

    .. math:: z_i = x_{\pi(i)}, \qquad \log\lvert\det J\rvert = 0 .

    Args:
        permutation: :math:`\pi`, a permutation of ``0 .. n-1`` (any integer sequence).

    Example:
        >>> import torch
        >>> from freeflows.transforms import Permutation
        >>> t = Permutation([2, 0, 1])
        >>> z, log_det = t(torch.tensor([[10.0, 20.0, 30.0]]))
        >>> z, log_det
        (tensor([[30., 10., 20.]]), tensor([0.]))
        >>> t.inverse(z)
        tensor([[10., 20., 30.]])
    """

    def __init__(self, permutation: Tensor) -> None:
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
        r""":math:`z_i = x_{\pi(i)}` along axis 1.

        Args:
            x: data ``[B, n, ...]``.
            c: ignored.

        Returns:
            ``(z, zeros)``, ``[B, n, ...]`` and ``[B]``.
        """
        self._check(x)
        return x[:, self.permutation], x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        r""":math:`x_{\pi(i)} = z_i` along axis 1.

        Args:
            z: latent points ``[B, n, ...]``.
            c: ignored.

        Returns:
            The data points ``[B, n, ...]``.
        """
        self._check(z)
        return z[:, self.inverse_permutation]


class Reverse(Permutation):
    r"""Reverse the order of the ``features`` entries of axis 1, :math:`\pi(i) = n - 1 - i`.

    Args:
        features: ``n``, the size of axis 1.

    Example:
        >>> import torch
        >>> from freeflows.transforms import Reverse
        >>> Reverse(3)(torch.tensor([[1.0, 2.0, 3.0]]))[0]
        tensor([[3., 2., 1.]])
    """

    def __init__(self, features: int) -> None:
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        super().__init__(torch.arange(features - 1, -1, -1))


def check_features(x: Tensor, features: int, name: str) -> None:
    """Raise :class:`ValueError` unless ``x`` is a batch of vectors ``[B, features]``.

    Args:
        x: the input of a transform.
        features: the size that the transform was built for.
        name: the transform's name, for the message.

    Example:
        >>> import torch
        >>> from freeflows.transforms.base import check_features
        >>> check_features(torch.zeros(5, 3), 3, "MyTransform")
        >>> check_features(torch.zeros(5, 4), 3, "MyTransform")
        Traceback (most recent call last):
            ...
        ValueError: MyTransform expects vectors of shape [batch, 3], got (5, 4)
    """
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(f"{name} expects vectors of shape [batch, {features}], got {tuple(x.shape)}")


def check_image(x: Tensor, channels: int, name: str) -> None:
    """Raise :class:`ValueError` unless ``x`` is a batch of images ``[B, channels, H, W]``.

    Args:
        x: the input of a transform.
        channels: the number of channels that the transform was built for.
        name: the transform's name, for the message.

    Example:
        >>> import torch
        >>> from freeflows.transforms.base import check_image
        >>> check_image(torch.zeros(2, 3, 8, 8), 3, "MyTransform")
        >>> check_image(torch.zeros(2, 3, 8), 3, "MyTransform")
        Traceback (most recent call last):
            ...
        ValueError: MyTransform expects images of shape [batch, 3, height, width], got (2, 3, 8)
    """
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(
            f"{name} expects images of shape [batch, {channels}, height, width], got {tuple(x.shape)}"
        )
