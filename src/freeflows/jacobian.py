r"""Exact Jacobians and log-determinants of batched functions, with :mod:`torch.func`.

A *batched function* maps ``[B, *event]`` to ``[B, *event]`` row by row (no interaction between
rows). Its per-row Jacobian :math:`J_i = \partial f(x)_i / \partial x_i \in \mathbb{R}^{D\times D}`
is computed with ``vmap`` over rows of ``jacfwd`` (``D`` forward products) or ``jacrev`` (``D``
reverse products). ``chunk_size`` bounds how many rows are processed at once, so memory is
:math:`O(\text{chunk} \cdot D^2)` plus the network's activations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.func import jacfwd, jacrev, vmap

JacobianMode = Literal["auto", "forward", "reverse"]


def _single(fn: Callable[..., Tensor], with_c: bool) -> Callable[..., Tensor]:
    """Turn a batched function into one on a single flattened row."""

    if with_c:

        def one(x: Tensor, shape: tuple[int, ...], c: Tensor) -> Tensor:
            return fn(x.reshape(1, *shape), c.unsqueeze(0)).reshape(-1)

    else:

        def one(x: Tensor, shape: tuple[int, ...], c: Tensor | None = None) -> Tensor:
            return fn(x.reshape(1, *shape)).reshape(-1)

    return one


def batch_jacobian(
    fn: Callable[..., Tensor],
    x: Tensor,
    c: Tensor | None = None,
    *,
    mode: JacobianMode = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Per-row Jacobians ``[B, D, D]`` of a batched ``fn(x)`` (or ``fn(x, c)``), with ``D`` the
    number of elements of one event.

    ``mode`` chooses forward-mode (``jacfwd``) or reverse-mode (``jacrev``) products; ``"auto"``
    uses forward mode, which is as cheap as reverse for square Jacobians and needs no graph.
    ``chunk_size`` (rows per ``vmap`` call) bounds memory; the result does not depend on it.
    """
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"unknown Jacobian mode {mode!r}; choose 'auto', 'forward' or 'reverse'")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    shape = tuple(x.shape[1:])
    flat = x.reshape(x.shape[0], -1)
    one = _single(fn, c is not None)
    jac = jacrev if mode == "reverse" else jacfwd
    per_row = jac(lambda xi, ci: one(xi, shape, ci))
    in_dims = (0, 0 if c is not None else None)
    return vmap(per_row, in_dims=in_dims, chunk_size=chunk_size)(flat, c)


def log_abs_det(jac: Tensor, basis: Tensor | None = None) -> Tensor:
    r""":math:`\log\lvert\det J\rvert` of a batch of square matrices ``[B, D, D]``.

    With an orthonormal ``basis`` :math:`Q \in \mathbb{R}^{D\times m}` of an invariant subspace,
    returns :math:`\log\lvert\det Q^\top J Q\rvert`, the log-volume change within the subspace.
    """
    if basis is not None:
        q = basis.to(jac)
        jac = q.T @ jac @ q
    return torch.linalg.slogdet(jac).logabsdet


def log_abs_det_jacobian(
    fn: Callable[..., Tensor],
    x: Tensor,
    c: Tensor | None = None,
    *,
    basis: Tensor | None = None,
    mode: JacobianMode = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Exact :math:`\log\lvert\det \partial f/\partial x\rvert` per row, ``[B]``."""
    return log_abs_det(batch_jacobian(fn, x, c, mode=mode, chunk_size=chunk_size), basis)
