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
    r"""A linear layer whose weight is multiplied by a fixed 0/1 mask, :math:`y = (W \odot M) x + b`.

    Args:
        mask: :math:`M`, of shape ``[out_features, in_features]``.

    Example:
        >>> import torch
        >>> from freeflows.transforms import MaskedLinear
        >>> layer = MaskedLinear(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        >>> x = torch.randn(4, 2, requires_grad=True)
        >>> (g,) = torch.autograd.grad(layer(x)[:, 0].sum(), x)
        >>> bool((g[:, 1] == 0).all())  # output 0 does not see input 1
        True
    """

    def __init__(self, mask: Tensor) -> None:
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        r""":math:`(W \odot M) x + b`.

        Args:
            x: inputs ``[B, in_features]``.

        Returns:
            ``[B, out_features]``.
        """
        return F.linear(x, self.weight * self.mask, self.bias)


def made_degrees(features: int, hidden: int) -> Tensor:
    """Degrees of the hidden units of :class:`MADE`, cycling through ``1 .. D-1`` (all ``0`` when
    ``D = 1``: such units see only the condition and the bias).

    Args:
        features: ``D``.
        hidden: the number of hidden units.

    Returns:
        Integer degrees ``[hidden]``.

    Example:
        >>> from freeflows.transforms.autoregressive import made_degrees
        >>> made_degrees(3, 5)
        tensor([1, 2, 1, 2, 1])
    """
    if features == 1:
        return torch.zeros(hidden, dtype=torch.long)
    return torch.arange(hidden) % (features - 1) + 1


class MADE(nn.Module):
    r"""Masked autoencoder for distribution estimation.

    Maps ``[B, D]`` (and a condition ``[B, C]``) to ``[B, P, D]``, ``P = params_per_feature``,
    such that output ``[:, p, i]`` depends only on the inputs ``j`` that come before ``i`` in
    ``order``. Input ``i`` has degree :math:`d_i` = its 1-based position in the order; a hidden
    unit of degree :math:`m` may see inputs of degree :math:`\le m`; output ``i`` may see hidden
    units of degree :math:`< d_i`. Hence

    .. math:: \frac{\partial\,\text{out}_{p,i}}{\partial x_j} = 0 \quad \text{unless } d_j < d_i :

    the Jacobian is strictly triangular in that order. The condition enters the first hidden
    layer without a mask. Activations are SiLU. The output layer starts at zero.

    Args:
        features: ``D``.
        params_per_feature: ``P``.
        hidden: width of the hidden layers.
        layers: number of hidden layers.
        condition_dim: features of the condition, or ``None``.
        order: ``order[i]`` is the position (0-based) of feature ``i``; default ``0..D-1``.

    References:
        Germain, Gregor, Murray and Larochelle, "MADE: Masked Autoencoder for Distribution
        Estimation" (2015), arXiv:1502.03509.

    Example:
        >>> import torch
        >>> from freeflows.transforms import MADE
        >>> made = MADE(3, 2, hidden=8, order=torch.tensor([2, 0, 1]))
        >>> _ = torch.nn.init.normal_(made.output.weight)  # the output layer starts at zero
        >>> x = torch.randn(3)
        >>> jac = torch.autograd.functional.jacobian(lambda v: made(v[None])[0, 0], x)
        >>> (jac != 0).int()  # feature 1 comes first, then 2, then 0
        tensor([[0, 1, 1],
                [0, 0, 0],
                [0, 1, 0]], dtype=torch.int32)
    """

    def __init__(
        self,
        features: int,
        params_per_feature: int,
        hidden: int = 64,
        layers: int = 2,
        condition_dim: int | None = None,
        order: Tensor | None = None,
    ) -> None:
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
        """The autoregressive parameters of every feature in one pass.

        Args:
            x: inputs ``[B, D]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``[B, P, D]``; entry ``[:, p, i]`` depends only on the features before ``i``.
        """
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
    ) -> None:
        super().__init__()
        if clamp is not None and not clamp > 0:
            raise ValueError(f"clamp must be positive or None, got {clamp}")
        self.features = features
        self.clamp = clamp
        self.made = MADE(features, 2, hidden, layers, condition_dim, order)

    def scale_shift(self, u: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        r"""The soft-clamped log-scales :math:`s(u_{<i}, c)` and the shifts :math:`t(u_{<i}, c)`,
        ``[B, D]`` each, from one MADE pass."""
        p = self.made(u, c)
        return soft_clamp(p[:, 0], self.clamp), p[:, 1]

    def one_pass(self, u: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        r""":math:`y = u e^{s(u)} + t(u)` and :math:`\sum_i s_i`."""
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
    r"""One MAF layer:

    .. math:: z_i = x_i\, e^{s_i(x_{<i}, c)} + t_i(x_{<i}, c), \qquad
       \log\lvert\det \partial z/\partial x\rvert = \textstyle\sum_i s_i(x_{<i}, c),

    with :math:`(\tilde s, t)` from a :class:`MADE` and :math:`s = \kappa\tanh(\tilde s/\kappa)`.
    ``forward`` (data → latent, the density) is one MADE pass; ``inverse`` (latent → data,
    sampling) is ``D`` sequential passes.

    Args:
        features: ``D``.
        hidden: width of the MADE's hidden layers.
        layers: number of the MADE's hidden layers.
        condition_dim: features of the condition ``c``, or ``None``.
        order: ``order[i]`` is the position (0-based) of feature ``i``; default ``0..D-1``.
        clamp: :math:`\kappa > 0`, the bound of the log-scale; ``None`` for no clamp.

    References:
        Papamakarios, Pavlakou and Murray, "Masked Autoregressive Flow for Density Estimation"
        (2017), arXiv:1705.07057.

    Example:
        >>> import torch
        >>> from freeflows.transforms import MaskedAutoregressive
        >>> t = MaskedAutoregressive(3, hidden=16, condition_dim=2)
        >>> x, c = torch.randn(5, 3), torch.randn(5, 2)
        >>> z, log_det = t(x, c)
        >>> z.shape, log_det.shape, torch.allclose(t.inverse(z, c), x, atol=1e-6)
        (torch.Size([5, 3]), torch.Size([5]), True)
    """

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Data to latent in one MADE pass.

        Args:
            x: data ``[B, D]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``(z, log_det)`` with :math:`\log\lvert\det\rvert = \sum_i s_i`, ``[B, D]`` and ``[B]``.
        """
        check_features(x, self.features, "MaskedAutoregressive")
        return self.one_pass(x, c)

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """Latent to data in ``D`` sequential MADE passes (exact, not iterative refinement).

        Args:
            z: latent points ``[B, D]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            The data points ``[B, D]``.
        """
        check_features(z, self.features, "MaskedAutoregressive")
        return self.sequential(z, c)[0]


class InverseAutoregressive(_Autoregressive):
    r"""One IAF layer:

    .. math:: x_i = z_i\, e^{s_i(z_{<i}, c)} + t_i(z_{<i}, c), \qquad
       \log\lvert\det \partial z/\partial x\rvert = -\textstyle\sum_i s_i(z_{<i}, c).

    ``inverse`` (latent → data, sampling) is one MADE pass; ``forward`` (data → latent, the
    density) is ``D`` sequential passes.

    Args:
        features: ``D``.
        hidden: width of the MADE's hidden layers.
        layers: number of the MADE's hidden layers.
        condition_dim: features of the condition ``c``, or ``None``.
        order: ``order[i]`` is the position (0-based) of feature ``i``; default ``0..D-1``.
        clamp: :math:`\kappa > 0`, the bound of the log-scale; ``None`` for no clamp.

    References:
        Kingma, Salimans, Jozefowicz, Chen, Sutskever and Welling, "Improving Variational
        Inference with Inverse Autoregressive Flow" (2016), arXiv:1606.04934.

    Example:
        >>> import torch
        >>> from freeflows.transforms import InverseAutoregressive
        >>> t = InverseAutoregressive(3, hidden=16)
        >>> z = torch.randn(5, 3)
        >>> x = t.inverse(z)
        >>> z_back, log_det = t(x)
        >>> log_det.shape, torch.allclose(z_back, z, atol=1e-6)
        (torch.Size([5]), True)
    """

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Data to latent in ``D`` sequential MADE passes.

        Args:
            x: data ``[B, D]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``(z, log_det)`` with :math:`\log\lvert\det\rvert = -\sum_i s_i`, ``[B, D]`` and ``[B]``.
        """
        check_features(x, self.features, "InverseAutoregressive")
        z, sum_s = self.sequential(x, c)
        return z, -sum_s

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """Latent to data in one MADE pass.

        Args:
            z: latent points ``[B, D]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            The data points ``[B, D]``.
        """
        check_features(z, self.features, "InverseAutoregressive")
        return self.one_pass(z, c)[0]
