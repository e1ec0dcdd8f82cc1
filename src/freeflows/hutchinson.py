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
    """Raise :class:`ValueError` for an unknown mode or an impossible number of samples."""
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
    """Draw ``k`` probe vectors per row: ``[k, batch, D]`` with :math:`E[v v^T] = I` (or the
    projector :math:`QQ^T` when ``basis`` is given; then ``dim`` is the subspace dimension)."""
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
