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
    r"""The root :math:`a` of :math:`\varphi(a) = a + w^\top\hat u\tanh(a + b) - y = 0`, by
    bracketed Newton: each Newton step that leaves the current bracket is replaced by bisection.

    Args:
        y: :math:`w^\top x`.
        wu: :math:`w^\top \hat u > -1`.
        b: the bias :math:`b`.
        tol: stop when :math:`|\varphi(a)| \le \text{tol}\,(1 + |y|)` for every row.
        max_iter: stop after this many steps.

    Returns:
        The roots, with the shape of ``y``, ``wu`` and ``b`` broadcast together (``[B]``).

    Example:
        >>> import torch
        >>> from freeflows.transforms import solve_planar
        >>> y, wu, b = torch.tensor([0.3, -2.0]), torch.tensor([0.5, -0.9]), torch.tensor(0.1)
        >>> a = solve_planar(y, wu, b, tol=1e-6)
        >>> bool(torch.allclose(a + wu * torch.tanh(a + b), y, atol=1e-5))
        True
    """
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
    r"""One planar transform on ``features``-vectors, latent to data in closed form:

    .. math:: x = z + \hat u \tanh(w^\top z + b), \qquad
       \log\lvert\det \partial x/\partial z\rvert = \log\bigl(1 + (1 - \tanh^2(w^\top z + b))\,
       w^\top \hat u\bigr),

    with :math:`\hat u` reparametrised so that :math:`w^\top \hat u > -1` (invertible). In the
    library's direction convention ``inverse`` is this map (sampling) and ``forward`` its
    numerical inverse (densities); see the module docstring.

    With ``condition_dim``, a linear hypernetwork (zero at initialisation) adds a
    condition-dependent offset to :math:`(u, w, b)`. Each layer starts volume-preserving,
    :math:`w^\top \hat u = 0`.

    Args:
        features: ``D``.
        condition_dim: features of the condition, or ``None``.
        tol: solver tolerance on :math:`\varphi`; default :math:`\epsilon^{3/4}` of the dtype
            (about ``2e-12`` in float64, ``6e-6`` in float32).
        max_iter: cap on solver steps.

    References:
        Rezende and Mohamed, "Variational Inference with Normalizing Flows" (2015),
        arXiv:1505.05770.

    Example:
        >>> import torch
        >>> from freeflows.transforms import Planar
        >>> t = Planar(2).double()
        >>> z = torch.randn(4, 2, dtype=torch.float64)
        >>> x = t.inverse(z)
        >>> z_back, log_det = t(x)
        >>> torch.allclose(z_back, z)
        True
        >>> g = lambda v: t.inverse(v[None])[0]  # the closed-form map, latent to data
        >>> jac = torch.stack([torch.autograd.functional.jacobian(g, v) for v in z_back])
        >>> torch.allclose(log_det, -torch.linalg.slogdet(jac).logabsdet)
        True
    """

    def __init__(
        self,
        features: int,
        condition_dim: int | None = None,
        tol: float | None = None,
        max_iter: int = 100,
    ) -> None:
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
        r"""The effective parameters :math:`(\hat u, w, b)`, with the hypernetwork's offsets.

        Args:
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            :math:`\hat u` and :math:`w` of shape ``[B, D]`` (``[1, D]`` without a condition) and
            :math:`b` of shape ``[B]`` (``[1]``).
        """
        u, w, b = self.u[None], self.w[None], self.b.reshape(1)
        if self.hyper is not None and c is not None:
            du, dw, db = self.hyper(c).split([self.features, self.features, 1], dim=-1)
            u, w, b = u + du, w + dw, b + db[:, 0]
        wu = (w * u).sum(dim=-1, keepdim=True)
        u_hat = u + (F.softplus(wu) - 1 + MIN_SLOPE - wu) * w / w.square().sum(dim=-1, keepdim=True)
        return u_hat, w, b

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        r"""Latent to data, closed form: :math:`x = z + \hat u \tanh(w^\top z + b)`.

        Args:
            z: latent points ``[B, D]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            The data points ``[B, D]``.
        """
        check_features(z, self.features, "Planar")
        u, w, b = self.params(c)
        return z + u * torch.tanh((w * z).sum(dim=-1) + b)[:, None]

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Data to latent, numerically (:func:`solve_planar`, then one Newton step with autograd,
        so that gradients are the exact implicit-function gradients).

        Args:
            x: data ``[B, D]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``(z, log_det)`` with :math:`\log\lvert\det \partial z/\partial x\rvert =
            -\log(1 + h'(w^\top z + b)\, w^\top \hat u)`, ``[B, D]`` and ``[B]``.
        """
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
