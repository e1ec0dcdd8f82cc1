"""Exact bijections: ``forward(x, c) -> (z, log_det)`` (data to latent) and ``inverse(z, c) -> x``."""

from .autoregressive import MADE, InverseAutoregressive, MaskedAutoregressive, MaskedLinear
from .base import ComposedTransform, Permutation, Reverse, Transform
from .coupling import AdditiveCoupling, AffineCoupling, DiagonalScaling, half_mask
from .glow import ActNorm, ImageAffineCoupling, InvertibleConv1x1, InvertibleLinear, MultiScale, Squeeze
from .planar import Planar, solve_planar

__all__ = [
    "MADE",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "ComposedTransform",
    "DiagonalScaling",
    "ImageAffineCoupling",
    "InverseAutoregressive",
    "InvertibleConv1x1",
    "InvertibleLinear",
    "MaskedAutoregressive",
    "MaskedLinear",
    "MultiScale",
    "Permutation",
    "Planar",
    "Reverse",
    "Squeeze",
    "Transform",
    "half_mask",
    "solve_planar",
]
