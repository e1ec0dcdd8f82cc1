r"""Hutchinson probe vectors with :math:`\mathbb E[v v^\top] = I` exactly.

For any square :math:`A`, :math:`\mathbb E[v^\top A v] = \operatorname{tr}(A\,\mathbb E[v v^\top])
= \operatorname{tr} A`. Three distributions have the identity as second moment:

* ``"gaussian"``: :math:`v \sim \mathcal N(0, I_m)`;
* ``"rademacher"``: independent :math:`\pm 1` entries;
* ``"sphere"``: :math:`v = \sqrt m\, u` with :math:`u` uniform on the unit sphere
  (:math:`\mathbb E[u u^\top] = I/m`). With ``k > 1`` samples the ``k`` directions are the first
  ``k`` columns of a Haar-random orthogonal matrix, so they are mutually orthogonal (each still
  uniform), which lowers the variance; with ``k = m`` the estimate is the exact trace. This is why
  ``k`` cannot exceed ``m`` in this mode.

When the latent lives on a subspace with orthonormal basis :math:`Q`, vectors are drawn in
:math:`\mathbb R^m` and mapped to :math:`Q v`, so that :math:`\mathbb E[(Qv)(Qv)^\top] = QQ^\top`,
the projector onto the subspace.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

HutchinsonMode = Literal["gaussian", "rademacher", "sphere"]
HUTCHINSON_MODES: tuple[str, ...] = ("gaussian", "rademacher", "sphere")


def check_hutchinson(mode: str, samples: int, dim: int) -> None:
    """Check a probe distribution and a number of probes per row.

    Args:
        mode: ``"gaussian"``, ``"rademacher"`` or ``"sphere"``.
        samples: probes per row, ``>= 1``.
        dim: the dimension ``m`` the probes live in.

    Raises:
        ValueError: for an unknown mode, a number of samples that is not a positive integer, or
            more than ``dim`` samples in the ``"sphere"`` mode (whose probes are orthogonal).

    Example:
        >>> from freeflows.hutchinson import check_hutchinson
        >>> check_hutchinson("sphere", 2, 3)
        >>> check_hutchinson("sphere", 4, 3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: hutchinson_samples=4 exceeds the dimension 3: ...
    """
    if mode not in HUTCHINSON_MODES:
        raise ValueError(f"unknown Hutchinson mode {mode!r}; choose one of {', '.join(HUTCHINSON_MODES)}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"hutchinson_samples must be a positive integer, got {samples!r}")
    if mode == "sphere" and samples > dim:
        raise ValueError(
            f"hutchinson_samples={samples} exceeds the dimension {dim}: the 'sphere' mode draws "
            f"mutually orthogonal vectors, so at most {dim} of them"
        )


def hutchinson_vectors(
    k: int,
    batch: int,
    dim: int,
    mode: HutchinsonMode = "gaussian",
    *,
    basis: Tensor | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Draw ``k`` probe vectors per row with :math:`\mathbb E[v v^\top] = I`, so that
    :math:`\mathbb E[v^\top A v] = \operatorname{tr} A` for any square :math:`A` (see the
    module docstring for the three distributions).

    Args:
        k: probes per row (at most ``dim`` in the ``"sphere"`` mode).
        batch: number of rows ``B``.
        dim: dimension ``m`` of each probe: ``D``, or the subspace dimension with ``basis``.
        mode: ``"gaussian"``, ``"rademacher"`` or ``"sphere"``.
        basis: orthonormal ``[D, m]``; the probes are then :math:`Qv`, with
            :math:`\mathbb E[(Qv)(Qv)^\top] = QQ^\top`, the projector onto the subspace.
        device: device of the result.
        dtype: dtype of the result.
        generator: random number generator, for reproducible draws.

    Returns:
        ``[k, B, m]``, or ``[k, B, D]`` with a ``basis``.

    References:
        Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
        smoothing splines", Communications in Statistics - Simulation and Computation 18(3)
        (1989).

    Example:
        >>> import torch
        >>> from freeflows import hutchinson_vectors
        >>> gen = torch.Generator().manual_seed(0)
        >>> v = hutchinson_vectors(3, 2, 3, "sphere", generator=gen)
        >>> v.shape
        torch.Size([3, 2, 3])
        >>> a = torch.randn(3, 3, generator=gen)
        >>> estimate = torch.einsum("kbi,ij,kbj->b", v, a, v) / 3  # k = m orthogonal probes
        >>> torch.allclose(estimate, torch.trace(a).expand(2), atol=1e-5)
        True
    """
    check_hutchinson(mode, k, dim)
    kw = {"device": device, "dtype": dtype, "generator": generator}
    if mode == "gaussian":
        v = torch.randn(k, batch, dim, **kw)
    elif mode == "rademacher":
        v = torch.randint(0, 2, (k, batch, dim), device=device, generator=generator).to(
            dtype or torch.get_default_dtype()
        )
        v = 2 * v - 1
    else:
        g = torch.randn(batch, dim, k, **kw)
        q, r = torch.linalg.qr(g)  # q: [batch, dim, k] with orthonormal columns
        # Fix the sign ambiguity of QR so that q is Haar-distributed.
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        v = q.permute(2, 0, 1) * dim**0.5
    if basis is not None:
        v = v @ basis.to(v).T
    return v
