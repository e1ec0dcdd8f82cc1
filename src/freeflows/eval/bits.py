r"""Bits per dimension of discrete images from the density of their dequantised values.

For integer pixels :math:`v \in \{0, \dots, L-1\}^D` dequantised to :math:`x = (v + u)/L \in
[0, 1)^D`, :math:`u \sim \mathcal U[0, 1)^D`, a density :math:`q` of :math:`x` is the density
:math:`q(x)/L^D` of :math:`v + u` on the :math:`[0, L)` scale, and
:math:`-\mathbb E_u \log_2 (q(x)/L^D)` bounds :math:`-\log_2 P(v)` of the discrete model
:math:`P(v) = \int q` over the pixel's bin from above. Per dimension,

.. math:: \mathrm{bits/dim} = \frac{\mathrm{NLL} + D \log L}{D \ln 2},

with NLL the mean :math:`-\log q(x)` in nats. A data set opts in with ``kind="image"`` and
``meta["levels"]`` (:math:`L`); :math:`D` is ``meta["bits_per_dim_dim"]`` or the event size.

References:
    Theis, van den Oord and Bethge, "A note on the evaluation of generative models" (2015),
    arXiv:1511.01844.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def bits_per_dim(nll: float, dim: int, levels: int) -> float:
    r""":math:`(\mathrm{NLL} + D\log L)/(D\ln 2)` (see the module docstring).

    Args:
        nll: mean :math:`-\log q(x)` in nats, with :math:`x \in [0, 1]^D`.
        dim: :math:`D`.
        levels: :math:`L`, grey levels per pixel.

    Returns:
        Bits per dimension.

    Example:
        >>> import math
        >>> from freeflows.eval.bits import bits_per_dim
        >>> math.isclose(bits_per_dim(0.0, 64, 17), math.log2(17))  # uniform density on [0, 1]^64
        True
    """
    if dim < 1 or levels < 2:
        raise ValueError(f"bits_per_dim needs dim >= 1 and levels >= 2, got {dim}, {levels}")
    return (nll + dim * math.log(levels)) / (dim * math.log(2))


def bits_metrics(metrics: Mapping[str, Any], meta: Mapping[str, Any], dim: int) -> dict[str, Any]:
    r"""``test_bits_per_dim`` (and ``_stderr``) from a run's ``test_nll``, the normalised density
    of what the model samples; for a free-form flow also ``test_bits_per_dim_paper`` from
    ``test_nll_paper``, the papers' value, **not normalised**.

    Args:
        metrics: the run's metrics with ``test_nll`` (nats, on the [0, 1] scale).
        meta: the data set's ``meta``, with ``levels``.
        dim: :math:`D` when ``meta`` has no ``bits_per_dim_dim``.

    Returns:
        The new keys.

    Example:
        >>> from freeflows.eval.bits import bits_metrics
        >>> out = bits_metrics({"test_nll": -10.0, "test_nll_stderr": 0.5}, {"levels": 17}, 64)
        >>> round(out["test_bits_per_dim"], 4), round(out["test_bits_per_dim_stderr"], 5)
        (3.862, 0.01127)
    """
    d, levels = int(meta.get("bits_per_dim_dim", dim)), int(meta["levels"])
    out: dict[str, Any] = {}
    for suffix in ("", "_paper"):
        nll = metrics.get(f"test_nll{suffix}")
        if nll is None or not math.isfinite(nll):
            continue
        out[f"test_bits_per_dim{suffix}"] = bits_per_dim(nll, d, levels)
        stderr = metrics.get(f"test_nll{suffix}_stderr")
        if stderr is not None:
            out[f"test_bits_per_dim{suffix}_stderr"] = stderr / (d * math.log(2))
    return out
