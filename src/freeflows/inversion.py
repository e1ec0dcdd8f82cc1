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

**Inverting the decoder** (:func:`invert_decoder`) solves :math:`g(z) = x` for :math:`z`, which
the exact density of the decoder's draws needs: :math:`\log q(x) = \log p_Z(z^*) -
\log\lvert\det J_g(z^*)\rvert` at :math:`g(z^*) = x`. It starts at :math:`z_0 = f(x)` and takes
damped Newton steps :math:`z \leftarrow z - \alpha\, J^{-1}(g(z) - x)`. The Jacobian is
refactorised only when the residual stops shrinking fast (a chord method), so a point near the
data, where :math:`z_0` is already close, costs about two Jacobians: one at :math:`z_0` and the
one at :math:`z^*` that the log-determinant needs anyway, which also confirms convergence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

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

    References:
        Draxler, Sorrenson, Zimmermann, Rousselot and Köthe, "Free-form flows: Make Any
        Architecture a Normalizing Flow" (AISTATS 2024), arXiv:2310.16624 (the free-form flow
        whose encoder this inverts).

    Example:
        >>> import torch
        >>> from freeflows.inversion import invert_encoder
        >>> f = lambda x, c=None: x + 0.2 * torch.sin(x)  # the encoder
        >>> g = lambda z, c=None: z - 0.2 * torch.sin(z)  # an approximate inverse
        >>> z = torch.randn(6, 2)
        >>> x, residual = invert_encoder(f, g, z, steps=20)
        >>> bool((residual < 1e-5).all()), torch.allclose(f(x), z, atol=1e-5)
        (True, True)
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


def _project(r: Tensor, q: Tensor | None) -> Tensor:
    """Residuals in the subspace's coordinates :math:`Q^\top r` (all of ``r`` without a basis)."""
    return r if q is None else r @ q


class DecoderInverse(NamedTuple):
    """Result of :func:`invert_decoder`, one entry per row.

    Attributes:
        z: the best iterate.
        jacobian: :math:`J_g` at ``z``.
        residual: the residual at ``z``.
        converged: whether ``residual`` is within the tolerance.

    Example:
        >>> import torch
        >>> from freeflows.inversion import invert_decoder
        >>> g = lambda z, c=None: 2 * z
        >>> vj = lambda z, c=None: (g(z), 2 * torch.eye(2).expand(len(z), 2, 2))
        >>> out = invert_decoder(vj, g, torch.ones(3, 2), torch.zeros(3, 2))
        >>> out.z[0], out.converged
        (tensor([0.5000, 0.5000]), tensor([True, True, True]))
    """

    z: Tensor
    """The best iterate :math:`z`, ``[B, *event]``."""
    jacobian: Tensor
    """:math:`J_g` at ``z``, ``[B, D, D]`` (reduced to the subspace, ``[B, m, m]``, with a basis)."""
    residual: Tensor
    r""":math:`\lVert g(z) - x\rVert`, ``[B]`` (of :math:`Q^\top (g(z) - x)` with a basis)."""
    converged: Tensor
    """Whether ``residual`` is within the tolerance, ``[B]`` (bool)."""


def decoder_tolerance(x: Tensor, rtol: float | None = None) -> Tensor:
    r"""Per-row tolerance :math:`r (1 + \lVert x\rVert)` of :func:`invert_decoder`.

    Args:
        x: the points ``[B, *event]``.
        rtol: :math:`r`; ``None`` for ``1e-4`` in float32 and ``1e-9`` in float64.

    Returns:
        ``[B]``.

    Example:
        >>> import torch
        >>> from freeflows.inversion import decoder_tolerance
        >>> decoder_tolerance(torch.tensor([[3.0, 4.0]]), rtol=0.01)  # 0.01 * (1 + 5)
        tensor([0.0600])
    """
    if rtol is None:
        rtol = 1e-9 if x.dtype == torch.float64 else 1e-4
    return rtol * (1 + _norms(x))


@torch.no_grad()
def invert_decoder(
    value_and_jacobian: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]],
    decode: Net,
    x: Tensor,
    z0: Tensor,
    c: Tensor | None = None,
    *,
    basis: Tensor | None = None,
    rtol: float | None = None,
    max_jacobians: int = 8,
    chord_steps: int = 8,
) -> DecoderInverse:
    r"""Solve :math:`g(z) = x` for :math:`z`, starting from ``z0`` (see the module docstring).

    Each round computes :math:`J_g` at the current iterate (``value_and_jacobian``) and then
    takes up to ``chord_steps`` steps :math:`z \leftarrow z - \alpha J^{-1}(g(z) - x)` with that
    Jacobian, each a single decoder pass; a step is kept only if it lowers the residual
    :math:`\lVert g(z) - x\rVert` (else :math:`\alpha` halves, at most 10 times). A round ends
    when a row's residual is below a hundredth of the tolerance, stops improving, or shrinks by
    less than half per step. Rows stop at ``max_jacobians`` Jacobians. With an orthonormal
    ``basis`` :math:`Q \in \mathbb R^{D\times m}` (a latent on a subspace), steps stay in that
    subspace: :math:`\delta = Q\,(Q^\top J Q)^{-1} Q^\top (g(z) - x)`.

    Args:
        value_and_jacobian: ``(z, c) -> (g(z), J_g(z))`` with ``J`` of shape ``[B, D, D]``.
        decode: ``(z, c) -> g(z)``.
        x: the points ``[B, *event]``.
        z0: starting points, usually :math:`f(x)`.
        c: conditions ``[B, C]`` or ``None``.
        basis: orthonormal basis ``[D, m]`` of the latent's subspace, or ``None``.
        rtol: tolerance of :func:`decoder_tolerance`.
        max_jacobians: Jacobians per row at most (the last one is at the returned ``z``).
        chord_steps: decoder passes per Jacobian at most.

    Returns:
        :class:`DecoderInverse`; ``jacobian`` is always evaluated at the returned ``z``.

    Example:
        >>> import torch
        >>> g = lambda z, c=None: z + 0.3 * torch.tanh(z)
        >>> vj = lambda z, c=None: (g(z), torch.diag_embed(1 + 0.3 / torch.cosh(z) ** 2))
        >>> x = torch.tensor([[0.5, -2.0]])
        >>> out = invert_decoder(vj, g, x, x.clone())
        >>> bool(out.converged.all()), bool(torch.allclose(g(out.z), x, atol=1e-5))
        (True, True)
    """
    if not isinstance(max_jacobians, int) or max_jacobians < 1:
        raise ValueError(f"max_jacobians must be a positive integer, got {max_jacobians!r}")
    if not isinstance(chord_steps, int) or chord_steps < 0:
        raise ValueError(f"chord_steps must be an integer >= 0, got {chord_steps!r}")
    batch, event = x.shape[0], x.shape[1:]
    tol = decoder_tolerance(x, rtol)
    q = None if basis is None else basis.to(x)
    z = z0.clone()
    size = x[0].numel() if q is None else q.shape[1]
    jac_out = x.new_full((batch, size, size), float("nan"))
    residual = x.new_full((batch,), float("inf"))
    converged = torch.zeros(batch, dtype=torch.bool, device=x.device)
    active = torch.arange(batch, device=x.device)
    for round_ in range(max_jacobians):
        ca = None if c is None else c[active]
        value, jac = value_and_jacobian(z[active], ca)
        if q is not None:
            jac = q.T @ jac @ q
        r = _project((value - x[active]).reshape(active.numel(), -1), q)
        res = r.norm(dim=1)
        jac_out[active] = jac
        residual[active] = res
        done = res <= tol[active]
        converged[active] = done
        keep = ~done & torch.isfinite(res)
        if round_ == max_jacobians - 1 or not bool(keep.any()):
            break
        active, jac, r, res = active[keep], jac[keep], r[keep], res[keep]
        ca = None if c is None else c[active]
        lu, pivots, info = torch.linalg.lu_factor_ex(jac)
        usable = info == 0
        if not bool(usable.all()):  # a singular Jacobian: these rows stop here
            active, lu, pivots, r, res = active[usable], lu[usable], pivots[usable], r[usable], res[usable]
            ca = None if c is None else c[active]
        if active.numel() == 0:
            break
        za = z[active].reshape(active.numel(), -1)
        tol_a = tol[active]
        xa = x[active]
        # Chord steps on a shrinking set of rows: a row leaves when it is far below the
        # tolerance, stops improving, or converges slowly (then it needs a fresh Jacobian).
        run = torch.arange(active.numel(), device=x.device)
        for _ in range(chord_steps):
            delta = torch.linalg.lu_solve(lu[run], pivots[run], r[run].unsqueeze(-1)).squeeze(-1)
            if q is not None:
                delta = delta @ q.T
            z_run, res_run = za[run], res[run]
            c_run = None if ca is None else ca[run]
            alpha = torch.ones_like(res_run)
            pending = torch.arange(run.numel(), device=x.device)
            for _ in range(11):  # backtracking: alpha = 1, 1/2, ..., 1/1024
                trial = z_run[pending] - alpha[pending].unsqueeze(1) * delta[pending]
                c_p = None if c_run is None else c_run[pending]
                g_trial = decode(trial.reshape(-1, *event), c_p)
                r_trial = _project((g_trial - xa[run[pending]]).reshape(pending.numel(), -1), q)
                res_trial = r_trial.norm(dim=1)
                ok = res_trial < res_run[pending]  # NaN never counts as better
                rows = run[pending[ok]]
                za[rows], r[rows], res[rows] = trial[ok], r_trial[ok], res_trial[ok]
                pending = pending[~ok]
                if pending.numel() == 0:
                    break
                alpha[pending] = alpha[pending] / 2
            improved = torch.ones(run.numel(), dtype=torch.bool, device=x.device)
            improved[pending] = False
            go_on = improved & (res[run] <= 0.5 * res_run) & (res[run] > 1e-2 * tol_a[run])
            run = run[go_on]
            if run.numel() == 0:
                break
        z[active] = za.reshape(-1, *event)
    return DecoderInverse(z, jac_out, residual, converged)
