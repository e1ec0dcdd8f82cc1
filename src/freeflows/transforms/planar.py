r"""Planar transforms (Rezende & Mohamed, 2015), with a numerical inverse for densities of data.

The planar map goes from latent to data,

.. math:: x = g(z) = z + \hat u\, h(w^\top z + b), \qquad h = \tanh,
   \qquad \log\lvert\det J_g(z)\rvert = \log\lvert 1 + h'(w^\top z + b)\, w^\top \hat u\rvert .

It is invertible when :math:`w^\top \hat u > -1`, which the reparametrisation

.. math:: \hat u = u + \bigl(m(w^\top u) - w^\top u\bigr) \frac{w}{\lVert w\rVert^2},
   \qquad m(a) = -1 + \epsilon + \operatorname{softplus}(a),

guarantees (:math:`w^\top \hat u = m(w^\top u) > -1`). The small :math:`\epsilon`
(:data:`MIN_SLOPE`, ``1e-4``) keeps this true in floating point too (``softplus`` underflows to
zero for very negative arguments), so :math:`\det J_g \ge \epsilon` and every log-determinant
is finite.

**Directions.** In the library's convention (forward = data → latent), :meth:`Planar.inverse`
is the closed-form :math:`g` (used for **sampling**) and :meth:`Planar.forward` is
:math:`g^{-1}`, which has no closed form and is computed numerically (used for the **density**
and for maximum-likelihood training on data).

**The numerical inverse.** Write :math:`a = w^\top z` and :math:`y = w^\top x`. Projecting
:math:`x = g(z)` on :math:`w` gives the scalar equation

.. math:: \varphi(a) = a + w^\top\hat u\,\tanh(a + b) - y = 0,
   \qquad \varphi'(a) = 1 + w^\top\hat u\,(1 - \tanh^2(a + b)) > 0,

which is strictly increasing, with its root inside :math:`[y - |w^\top\hat u|,\
y + |w^\top\hat u|]`. :func:`solve_planar` finds it by Newton's method safeguarded by bisection
on that bracket (vectorised over the batch), then :math:`z = x - \hat u \tanh(a + b)`.

**Gradients.** The solve runs without autograd. One more Newton step is then taken *with*
autograd, :math:`a = a_* - \varphi(a_*)/\varphi'(a_*)`. At the root (:math:`\varphi(a_*) = 0`)
its derivative with respect to any parameter or input :math:`\theta` is
:math:`-\partial_\theta\varphi / \varphi'`, exactly the implicit-function derivative of the
root, so :math:`z = x - \hat u\tanh(a + b)` and the log-determinant have exact first
derivatives (up to the solver tolerance). Evaluating :math:`x - \hat u\tanh(w^\top z_* + b)`
at a detached :math:`z_*` instead would drop the dependence of :math:`z` on the parameters
through :math:`a` and give wrong gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Transform, check_features

#: :math:`\epsilon` in :math:`m(a) = -1 + \epsilon + \operatorname{softplus}(a)`.
MIN_SLOPE = 1e-4


def solve_planar(y: Tensor, wu: Tensor, b: Tensor, tol: float, max_iter: int = 100) -> Tensor:
    r"""The root :math:`a` of :math:`a + w^\top\hat u\tanh(a + b) = y` (all arguments broadcast
    to ``[B]``), by bracketed Newton: each Newton step that leaves the current bracket is replaced
    by bisection. Stops when :math:`|\varphi(a)| \le \text{tol}\,(1 + |y|)` for every row, or after
    ``max_iter`` steps."""
    y, wu, b = torch.broadcast_tensors(y, wu, b)
    radius = wu.abs()
    lo, hi = y - radius, y + radius
    a = (y - wu * torch.tanh(y + b)).clamp(lo, hi)
    bound = tol * (1 + y.abs())
    for _ in range(max_iter):
        th = torch.tanh(a + b)
        phi = a + wu * th - y
        if bool((phi.abs() <= bound).all()):
            break
        lo = torch.where(phi < 0, a, lo)
        hi = torch.where(phi > 0, a, hi)
        newton = a - phi / (1 + wu * (1 - th.square()))
        inside = (newton > lo) & (newton < hi)
        a = torch.where(inside, newton, (lo + hi) / 2)
    return a


class Planar(Transform):
    r"""One planar transform on ``features``-vectors (see the module docstring).

    With ``condition_dim``, a linear hypernetwork (zero at initialisation) adds a
    condition-dependent offset to :math:`(u, w, b)`.

    Args:
        features: ``D``.
        condition_dim: features of the condition, or ``None``.
        tol: solver tolerance on :math:`\varphi`; default :math:`\epsilon^{3/4}` of the dtype
            (about ``2e-12`` in float64, ``6e-6`` in float32).
        max_iter: cap on solver steps.
    """

    def __init__(
        self,
        features: int,
        condition_dim: int | None = None,
        tol: float | None = None,
        max_iter: int = 100,
    ):
        super().__init__()
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        self.features = features
        self.tol = tol
        self.max_iter = max_iter
        # Random w; u is a small random vector whose component along w makes m(w^T u) = MIN_SLOPE
        # (w^T u = log(e - 1)), so that w^T u_hat = 0: each layer starts volume-preserving
        # instead of contracting by m(0) = log 2 - 1.
        w = torch.randn(features) / features**0.5
        u = 0.1 * torch.randn(features)
        u = u + (math.log(math.e - 1) - (w * u).sum()) * w / w.square().sum()
        self.w = nn.Parameter(w)
        self.u = nn.Parameter(u)
        self.b = nn.Parameter(torch.zeros(()))
        self.hyper = None
        if condition_dim is not None:
            self.hyper = nn.Linear(condition_dim, 2 * features + 1)
            nn.init.zeros_(self.hyper.weight)
            nn.init.zeros_(self.hyper.bias)

    def params(self, c: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        r""":math:`(\hat u, w, b)` of shapes ``[B or 1, D]``, ``[B or 1, D]``, ``[B or 1]``."""
        u, w, b = self.u[None], self.w[None], self.b.reshape(1)
        if self.hyper is not None and c is not None:
            du, dw, db = self.hyper(c).split([self.features, self.features, 1], dim=-1)
            u, w, b = u + du, w + dw, b + db[:, 0]
        wu = (w * u).sum(dim=-1, keepdim=True)
        u_hat = u + (F.softplus(wu) - 1 + MIN_SLOPE - wu) * w / w.square().sum(dim=-1, keepdim=True)
        return u_hat, w, b

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """Latent to data, closed form: :math:`x = z + \\hat u \\tanh(w^\\top z + b)`."""
        check_features(z, self.features, "Planar")
        u, w, b = self.params(c)
        return z + u * torch.tanh((w * z).sum(dim=-1) + b)[:, None]

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to latent, numerically; returns :math:`z` and
        :math:`-\\log(1 + h'(w^\\top z + b)\\, w^\\top \\hat u)`."""
        check_features(x, self.features, "Planar")
        u, w, b = self.params(c)
        wu = (w * u).sum(dim=-1)
        y = (w * x).sum(dim=-1)
        tol = self.tol if self.tol is not None else torch.finfo(x.dtype).eps ** 0.75
        with torch.no_grad():
            root = solve_planar(y, wu, b, tol, self.max_iter)
        th = torch.tanh(root + b)
        a = root - (root + wu * th - y) / (1 + wu * (1 - th.square()))  # one Newton step, with grad
        th = torch.tanh(a + b)
        z = x - u * th[:, None]
        return z, -torch.log1p(wu * (1 - th.square()))
