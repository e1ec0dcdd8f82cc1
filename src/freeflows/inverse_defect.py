r"""How far a decoder's Jacobian is from the inverse of an encoder's, from a few Jacobian–vector
products.

A free-form flow replaces :math:`J_f(x)^{-1}` by :math:`J_g(f(x))` in the gradient of
:math:`\log\lvert\det J_f\rvert` (see :mod:`freeflows.freeform`). The gradient's error for a
parameter :math:`\theta_k` is

.. math:: e_k = \operatorname{tr}\!\bigl((J_g - J_f^{-1})\,\partial_k J_f\bigr)
   = \operatorname{tr}\!\bigl((J_g J_f - I)\; J_f^{-1}\partial_k J_f\bigr),
   \qquad \lvert e_k\rvert \le \lVert J_g J_f - I\rVert_F\;
   \lVert J_f^{-1}\partial_k J_f\rVert_F

(Cauchy–Schwarz for the trace), so it vanishes linearly with the *inverse defect*
:math:`\lVert J_g(f(x))\, J_f(x) - I\rVert_F`. The reconstruction loss makes :math:`g\circ f`
close to the identity on the data, but that does not bound the defect of the Jacobians between
the data points; this module measures it.

**The estimator.** For any matrix :math:`A` and a probe :math:`v` with
:math:`\mathbb E[vv^\top] = I`,

.. math:: \mathbb E\,\lVert A v\rVert^2 = \operatorname{tr}(A\,\mathbb E[vv^\top]\,A^\top)
   = \lVert A\rVert_F^2 .

With :math:`A = J_g(f(x))\,J_f(x) - I`, :math:`Av = J_g(J_f v) - v` costs one forward-mode
product through the encoder (which also gives :math:`z = f(x)`) and one through the decoder at
:math:`z`, with the encoder's tangent as the decoder's input tangent; no Jacobian is formed.
``probes`` probes per row are averaged. For Gaussian probes the variance of one term is
:math:`2\lVert A^\top A\rVert_F^2`; Rademacher probes have the smaller
:math:`2(\lVert A^\top A\rVert_F^2 - \sum_i (A^\top A)_{ii}^2)`.

**Subspaces.** When the latent lives on a subspace with orthonormal basis
:math:`Q \in \mathbb R^{D\times m}` (the zero-centre-of-mass configurations of a particle system),
the identity is that of the subspace: the defect is
:math:`\lVert Q^\top J_g J_f Q - I_m\rVert_F`, estimated with probes :math:`Qv`,
:math:`v \in \mathbb R^m`, and residuals :math:`Q^\top(J_g J_f Q v) - v`.

The result is differentiable in the networks' parameters when autograd is on (the tangents of
:func:`freeflows.tangents.dual_forward` are), so it can also serve as a penalty.

References:
    Draxler, Sorrenson, Zimmermann, Rousselot and Köthe, "Free-form flows: Make Any Architecture
    a Normalizing Flow" (AISTATS 2024), arXiv:2310.16624 (Theorem 4.2 bounds the surrogate's
    gradient error by the inverse defect).

    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", Communications in Statistics - Simulation and Computation 18(3) (1989).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .hutchinson import HutchinsonMode, hutchinson_vectors
from .tangents import Unsupported, dual_forward

Net = nn.Module | Callable[..., Tensor]


def _repeat(t: Tensor | None, k: int) -> Tensor | None:
    return t if (t is None or k == 1) else t.repeat(k, *([1] * (t.dim() - 1)))


def _jg_jf(
    encoder: Net, decoder: Net, x: Tensor, v: Tensor, c: Tensor | None, encoder_takes_c: bool,
    decoder_takes_c: bool,
) -> Tensor:
    """:math:`J_g(f(x))\\,J_f(x)\\,v` for probes ``v`` ``[K, B, *event]``, as ``[K, B, *event]``."""
    k, batch = v.shape[0], x.shape[0]
    if k > 1:
        try:  # K tangents per row in one structured pass per network
            t = v.transpose(0, 1)
            z, jfv = dual_forward(encoder, x, t, c, encoder_takes_c)
            _, out = dual_forward(decoder, z, jfv, c, decoder_takes_c)
            return out.transpose(0, 1)
        except Unsupported:
            pass
    cs = _repeat(c, k)
    z, jfv = dual_forward(encoder, _repeat(x, k), v.reshape(k * batch, *x.shape[1:]), cs, encoder_takes_c)
    _, out = dual_forward(decoder, z, jfv, cs, decoder_takes_c)
    return out.reshape(v.shape)


def inverse_defect(
    encoder: Net,
    decoder: Net,
    x: Tensor,
    c: Tensor | None = None,
    *,
    probes: int = 1,
    mode: HutchinsonMode = "gaussian",
    basis: Tensor | None = None,
    encoder_takes_c: bool = True,
    decoder_takes_c: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Unbiased estimate, per row, of the squared inverse defect
    :math:`\lVert J_g(f(x))\,J_f(x) - I\rVert_F^2` (with a ``basis`` :math:`Q`,
    :math:`\lVert Q^\top J_g J_f Q - I\rVert_F^2`), the mean of
    :math:`\lVert J_g J_f v - v\rVert^2` over ``probes`` probes :math:`v`,
    :math:`\mathbb E[vv^\top] = I` (see the module docstring).

    Args:
        encoder: :math:`f`, a network ``[B, *event] -> [B, *event]`` (or such a function).
        decoder: :math:`g`, the same shapes.
        x: points ``[B, *event]``.
        c: conditions ``[B, C]``, or ``None``.
        probes: probes per row, ``>= 1``.
        mode: probe distribution, ``"gaussian"``, ``"rademacher"`` or ``"sphere"`` (see
            :mod:`freeflows.hutchinson`).
        basis: orthonormal ``[D, m]`` basis of the latent's subspace, or ``None``.
        encoder_takes_c: whether the encoder takes ``c`` itself; otherwise it sees ``[x, c]``
            concatenated (see :mod:`freeflows.conditioning`).
        decoder_takes_c: the same for the decoder.
        generator: random number generator of the probes, for reproducible estimates.

    Returns:
        ``[B]``, non-negative; differentiable in the networks' parameters when autograd is on.

    References:
        Draxler, Sorrenson, Zimmermann, Rousselot and Köthe, "Free-form flows: Make Any
        Architecture a Normalizing Flow" (AISTATS 2024), arXiv:2310.16624.

    Example:
        >>> import torch
        >>> from freeflows.inverse_defect import inverse_defect
        >>> a = torch.tensor([[2.0, 1.0], [0.0, 0.5]])
        >>> f = lambda x: x @ a.T  # J_f = a
        >>> g = lambda z: z @ torch.linalg.inv(a).T  # its exact inverse
        >>> x = torch.randn(3, 2)
        >>> inverse_defect(f, g, x, probes=4).abs().max() < 1e-6
        tensor(True)
        >>> h = lambda z: 1.1 * g(z)  # J_h J_f - I = 0.1 I, so the defect is 2 * 0.01
        >>> inverse_defect(f, h, x, probes=2, mode="sphere")  # orthogonal probes: exact
        tensor([0.0200, 0.0200, 0.0200])
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    batch, dim = x.shape[0], x[0].numel()
    if basis is not None and (basis.dim() != 2 or basis.shape[0] != dim):
        raise ValueError(f"basis must be [D, m] with D = {dim}, got {tuple(basis.shape)}")
    m = dim if basis is None else basis.shape[1]
    v = hutchinson_vectors(
        probes, batch, m, mode, basis=basis, device=x.device, dtype=x.dtype, generator=generator
    ).reshape(probes, batch, *x.shape[1:])
    residual = (_jg_jf(encoder, decoder, x, v, c, encoder_takes_c, decoder_takes_c) - v).reshape(
        probes, batch, dim
    )
    if basis is not None:
        residual = residual @ basis.to(residual)
    return residual.square().sum(dim=2).mean(dim=0)
