r"""Inverting a free-form flow's encoder, with its decoder as the preconditioner.

A free-form flow's decoder :math:`g` only approximates the inverse of its encoder :math:`f`, so
one decoder pass :math:`x = g(z)` draws from a slightly different distribution than the
encoder's :math:`\log q(x) = \log p_Z(f(x)) + \log\lvert\det J_f(x)\rvert`, which maximum
likelihood trains. To draw from the encoder's distribution, solve :math:`f(x) = z` by the fixed
point iteration

.. math:: x_0 = g(z), \qquad x_{k+1} = x_k + \alpha_k\,\bigl(g(z) - g(f(x_k))\bigr) .

A fixed point has :math:`g(f(x^*)) = g(z)`, so :math:`f(x^*) = z` wherever :math:`g` is
injective. The iteration map has Jacobian :math:`I - J_g(f(x))\,J_f(x)`, which the
reconstruction loss drives towards zero, so the iteration contracts quickly near the data (a
quasi-Newton step with :math:`J_g \approx J_f^{-1}`). It needs no Jacobian, only one encoder and
one decoder pass per step. Each sample has its own step size :math:`\alpha \le 1`, starting at 1:
a step that lowers the residual :math:`\lVert f(x) - z\rVert` is taken and doubles
:math:`\alpha` (up to 1); one that does not is rejected and halves it. So every sample keeps its
best iterate, and one that overshoots retries with a shorter step instead of stopping.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Net = Callable[[Tensor, Tensor | None], Tensor]


def _norms(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def invert_encoder(
    encode: Net,
    decode: Net,
    z: Tensor,
    c: Tensor | None = None,
    steps: int = 10,
    tol: float = 0.0,
) -> tuple[Tensor, Tensor]:
    r"""Approximate :math:`f^{-1}(z)` by ``steps`` iterations (see the module docstring).

    Args:
        encode: :math:`f(x, c)`, ``[B, *event] -> [B, *event]``.
        decode: :math:`g(z, c)`, the same shapes.
        z: latent points ``[B, *event]``.
        c: conditions ``[B, C]`` or ``None``.
        steps: number of iterations; ``0`` returns the decoder's :math:`g(z)`.
        tol: stop early once every residual is at most ``tol``.

    Returns:
        ``(x, residual)``: the best iterate per row and its :math:`\lVert f(x) - z\rVert`, ``[B]``.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    g_z = decode(z, c)
    x, e = g_z, encode(g_z, c)
    residual = _norms(e - z)
    alpha = torch.ones_like(residual)
    for _ in range(steps):
        if bool((residual <= tol).all()):
            break
        x_new = x + _rows(alpha, x) * (g_z - decode(e, c))
        e_new = encode(x_new, c)
        r_new = _norms(e_new - z)
        better = r_new < residual  # NaN never counts as better
        x = torch.where(_rows(better, x), x_new, x)
        e = torch.where(_rows(better, e), e_new, e)
        residual = torch.where(better, r_new, residual)
        alpha = torch.where(better, (2 * alpha).clamp(max=1.0), alpha / 2)
    return x, residual
