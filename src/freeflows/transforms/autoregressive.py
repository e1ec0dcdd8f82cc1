r"""Autoregressive transforms: MADE, MAF and IAF.

An autoregressive affine map transforms feature :math:`i` (in some order) with a scale and shift
that depend only on the features before it,

.. math:: y_i = u_i\, e^{s_i(u_{<i}, c)} + t_i(u_{<i}, c),
   \qquad \log\lvert\det \partial y / \partial u\rvert = \sum_i s_i ,

its Jacobian being triangular. :class:`MADE` computes all :math:`(s_i, t_i)` in one network pass
from :math:`u`; recovering :math:`u` from :math:`y` takes :math:`D` passes, one per feature, since
:math:`u_{<i}` must be known before :math:`u_i`. Which direction gets the single pass is the
whole difference between the two flows (forward = data → latent):

* **MAF** (:class:`MaskedAutoregressive`) conditions on the *data*: :math:`u = x`, :math:`y = z`.
  The density is **one pass**; sampling takes **D sequential passes**. Good for density
  estimation (maximum likelihood training).
* **IAF** (:class:`InverseAutoregressive`) conditions on the *latent*: :math:`u = z`, :math:`y = x`.
  Sampling is **one pass**; the density of given data takes **D sequential passes**. Good when
  one samples and scores its own samples (variational inference, reverse KL).

Scales are soft-clamped, :math:`s = \kappa\tanh(\tilde s/\kappa)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Transform, check_features
from .coupling import soft_clamp


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 ``mask`` of shape ``[out, in]``."""

    def __init__(self, mask: Tensor):
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def made_degrees(features: int, hidden: int) -> Tensor:
    """Degrees of hidden units, cycling through ``1 .. D-1`` (all ``0`` when ``D = 1``: such units
    see only the condition and the bias)."""
    if features == 1:
        return torch.zeros(hidden, dtype=torch.long)
    return torch.arange(hidden) % (features - 1) + 1


class MADE(nn.Module):
    r"""Masked autoencoder for distribution estimation (Germain et al., 2015).

    Maps ``[B, D]`` (and a condition ``[B, C]``) to ``[B, P, D]``, ``P = params_per_feature``,
    such that output ``[:, p, i]`` depends only on the inputs ``j`` that come before ``i`` in
    ``order``. Input ``i`` has degree :math:`d_i` = its 1-based position in the order; a hidden
    unit of degree :math:`m` may see inputs of degree :math:`\le m`; output ``i`` may see hidden
    units of degree :math:`< d_i`. Hence :math:`\partial\,\text{out}_{p,i} / \partial x_j = 0`
    unless :math:`d_j < d_i`: the Jacobian is strictly triangular in that order. The condition
    enters the first hidden layer without a mask. The output layer starts at zero.

    Args:
        features: ``D``.
        params_per_feature: ``P``.
        hidden, layers: width and number of hidden layers.
        condition_dim: features of the condition, or ``None``.
        order: ``order[i]`` is the position (0-based) of feature ``i``; default ``0..D-1``.
    """

    def __init__(
        self,
        features: int,
        params_per_feature: int,
        hidden: int = 64,
        layers: int = 2,
        condition_dim: int | None = None,
        order: Tensor | None = None,
    ):
        super().__init__()
        if features < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"MADE needs features, hidden, layers >= 1; got {features}, {hidden}, {layers}")
        order = torch.arange(features) if order is None else torch.as_tensor(order, dtype=torch.long)
        if order.shape != (features,) or not torch.equal(order.sort().values, torch.arange(features)):
            raise ValueError(f"order must be a permutation of 0..{features - 1}, got {order.tolist()}")
        self.features = features
        self.params_per_feature = params_per_feature
        self.register_buffer("degrees", order + 1)
        previous = self.degrees
        blocks: list[nn.Module] = []
        for _ in range(layers):
            degrees = made_degrees(features, hidden)
            blocks.append(MaskedLinear(degrees[:, None] >= previous[None, :]))
            previous = degrees
        self.hidden_layers = nn.ModuleList(blocks)
        out_degrees = self.degrees.repeat(params_per_feature)  # unit p * D + i has degree d_i
        self.output = MaskedLinear(out_degrees[:, None] > previous[None, :])
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.context = None if condition_dim is None else nn.Linear(condition_dim, hidden)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        h = self.hidden_layers[0](x)
        if self.context is not None and c is not None:
            h = h + self.context(c)
        h = F.silu(h)
        for layer in self.hidden_layers[1:]:
            h = F.silu(layer(h))
        return self.output(h).reshape(x.shape[0], self.params_per_feature, self.features)


class _Autoregressive(Transform):
    def __init__(
        self,
        features: int,
        hidden: int = 64,
        layers: int = 2,
        condition_dim: int | None = None,
        order: Tensor | None = None,
        clamp: float | None = 3.0,
    ):
        super().__init__()
        if clamp is not None and not clamp > 0:
            raise ValueError(f"clamp must be positive or None, got {clamp}")
        self.features = features
        self.clamp = clamp
        self.made = MADE(features, 2, hidden, layers, condition_dim, order)

    def scale_shift(self, u: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        p = self.made(u, c)
        return soft_clamp(p[:, 0], self.clamp), p[:, 1]

    def one_pass(self, u: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        """:math:`y = u e^{s(u)} + t(u)` and :math:`\\sum_i s_i`."""
        s, t = self.scale_shift(u, c)
        return u * torch.exp(s) + t, s.sum(dim=1)

    def sequential(self, y: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        r"""Solve :math:`y = u e^{s(u)} + t(u)` for :math:`u` with ``D`` passes and return
        :math:`u` and :math:`\sum_i s_i(u)`. After pass ``k`` the first ``k`` features in the order
        are exact, so the final pass evaluates :math:`s, t` at the exact :math:`u`. The loop is
        the function :math:`u(y)` itself (not an approximation), so autograd through it is exact.
        """
        u = torch.zeros_like(y)
        s = torch.zeros_like(y)
        for _ in range(self.features):
            s, t = self.scale_shift(u, c)
            u = (y - t) * torch.exp(-s)
        return u, s.sum(dim=1)


class MaskedAutoregressive(_Autoregressive):
    r"""One MAF layer: :math:`z_i = x_i e^{s_i(x_{<i}, c)} + t_i(x_{<i}, c)`.

    ``forward`` (data → latent, the density) is one MADE pass; ``inverse`` (latent → data,
    sampling) is ``D`` sequential passes. Arguments as in :class:`MADE`, plus ``clamp`` (bound of
    the log-scale, or ``None``).
    """

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features, "MaskedAutoregressive")
        return self.one_pass(x, c)

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        check_features(z, self.features, "MaskedAutoregressive")
        return self.sequential(z, c)[0]


class InverseAutoregressive(_Autoregressive):
    r"""One IAF layer: :math:`x_i = z_i e^{s_i(z_{<i}, c)} + t_i(z_{<i}, c)`.

    ``inverse`` (latent → data, sampling) is one MADE pass; ``forward`` (data → latent, the
    density) is ``D`` sequential passes, with :math:`\log\lvert\det \partial z/\partial x\rvert
    = -\sum_i s_i(z_{<i})`.
    """

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features, "InverseAutoregressive")
        z, sum_s = self.sequential(x, c)
        return z, -sum_s

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        check_features(z, self.features, "InverseAutoregressive")
        return self.one_pass(z, c)[0]
