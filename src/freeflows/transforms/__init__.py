r"""Exact bijections: ``forward(x, c) -> (z, log_det)`` (data to latent) and ``inverse(z, c) -> x``.

``log_det`` is :math:`\log\lvert\det \partial z/\partial x\rvert`, one value per row. Transforms
compose with :class:`ComposedTransform`, and a :class:`~freeflows.flows.Flow` turns one into a
density model with a latent distribution.

Example:
    >>> import torch
    >>> from freeflows.transforms import AffineCoupling, ComposedTransform, Reverse
    >>> t = ComposedTransform(AffineCoupling(4), Reverse(4), AffineCoupling(4))
    >>> x = torch.randn(8, 4)
    >>> z, log_det = t(x)
    >>> z.shape, log_det.shape, torch.allclose(t.inverse(z), x, atol=1e-6)
    (torch.Size([8, 4]), torch.Size([8]), True)
"""

from .autoregressive import MADE, InverseAutoregressive, MaskedAutoregressive, MaskedLinear
from .base import ComposedTransform, Permutation, Reverse, Transform
from .coupling import AdditiveCoupling, AffineCoupling, DiagonalScaling, half_mask
from .glow import ActNorm, ImageAffineCoupling, InvertibleConv1x1, InvertibleLinear, MultiScale, Squeeze
from .ode import ODETransform
from .planar import Planar, solve_planar
from .standardize import Standardizer
from .support import BoxLogit, PositiveLog

__all__ = [
    "MADE",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "BoxLogit",
    "ComposedTransform",
    "DiagonalScaling",
    "ImageAffineCoupling",
    "InverseAutoregressive",
    "InvertibleConv1x1",
    "InvertibleLinear",
    "MaskedAutoregressive",
    "MaskedLinear",
    "MultiScale",
    "ODETransform",
    "Permutation",
    "Planar",
    "PositiveLog",
    "Reverse",
    "Squeeze",
    "Standardizer",
    "Transform",
    "half_mask",
    "solve_planar",
]
