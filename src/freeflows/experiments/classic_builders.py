"""Builders of the classic exact flows by name, for the tool.

``CLASSIC_BUILDERS[kind](event_shape, condition_dim, **options)`` returns a
:class:`~freeflows.flows.Flow`; ``options`` are the keyword hyper-parameters of the named flow
(see :mod:`freeflows.flows`), and any other option raises :class:`ValueError` listing the valid
ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..checks import check_options
from ..flows import IAF, MAF, NICE, Glow, PlanarFlow, RealNVP

Builder = Callable[..., nn.Module]


def options_of(cls: type) -> tuple[str, ...]:
    """The keyword-only hyper-parameters of a named flow's constructor."""
    params = inspect.signature(cls.__init__).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _builder(cls: type, vectors_only: bool) -> Builder:
    valid = options_of(cls)

    def build(event_shape: tuple[int, ...], condition_dim: int | None = None, **options: Any) -> nn.Module:
        check_options(cls.__name__, options, valid)
        shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
        if vectors_only and len(shape) != 1:
            raise ValueError(f"{cls.__name__} works on vectors; got event shape {shape}")
        first = shape[0] if vectors_only else shape
        return cls(first, condition_dim, **options)

    build.__name__ = f"build_{cls.__name__.lower()}"
    build.__doc__ = f"Build a :class:`~freeflows.flows.{cls.__name__}`; options: {', '.join(valid)}."
    build.options = valid  # type: ignore[attr-defined]
    return build


CLASSIC_BUILDERS: dict[str, Builder] = {
    "planar": _builder(PlanarFlow, vectors_only=True),
    "nice": _builder(NICE, vectors_only=True),
    "realnvp": _builder(RealNVP, vectors_only=True),
    "glow": _builder(Glow, vectors_only=False),
    "maf": _builder(MAF, vectors_only=True),
    "iaf": _builder(IAF, vectors_only=True),
}
