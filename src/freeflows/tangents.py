r"""A network's output and a forward-mode tangent in one pass, differentiable in its parameters.

:func:`dual_forward` returns :math:`(f(x),\ J_f(x)\,t)`. Both are ordinary autograd tensors, so
the tangent can be backpropagated into the parameters of :math:`f` with a first-order backward
pass (reverse-over-forward); the free-form surrogate needs exactly this (see
:mod:`freeflows.freeform`).

:mod:`torch.autograd.forward_ad` gives it for any module, but on CPU its per-operator
bookkeeping (dual tensors, zero tangents of the parameters, the composite double-backward
formulas of the activations) costs more than the arithmetic for small networks: measured, it
made the free-form step ~2.3-2.9x an autoencoder step instead of ~1.4-1.6x
(``freeflows bench surrogate_modes``). So the building blocks of the networks in
:mod:`freeflows.nets` are written out with plain operators, with the same arithmetic:

* ``nn.Linear``: :math:`y = Wx + b`, :math:`\dot y = W\dot x`;
* ``nn.SiLU``: :math:`s = \sigma(x)`, :math:`y = xs`, :math:`\dot y = \dot x\,(s + y(1-s))`;
* ``nn.Tanh``: :math:`\dot y = \dot x\,(1 - y^2)`; ``nn.Identity``;
* ``nn.Sequential``, :class:`~freeflows.nets.resnet.ResidualBlock`,
  :class:`~freeflows.nets.ResNet` (a condition has zero tangent).

Modules are matched by exact type (a subclass may override ``forward``); any other module, at any
depth, goes through :mod:`torch.autograd.forward_ad`, so every network works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from .nets.resnet import ResidualBlock, ResNet

Dual = tuple[Tensor, Tensor]


class Unsupported(Exception):
    """A module without a structured rule met several tangents per row (``[B, K, *event]``),
    which only the structured rules carry; callers then fall back to ``torch.func``.

    Example:
        >>> import torch
        >>> from freeflows.tangents import Unsupported, jacobian
        >>> try:
        ...     jacobian(torch.nn.Softplus(), torch.randn(2, 3))
        ... except Unsupported as err:
        ...     print("no structured rule for", err)
        no structured rule for Softplus
    """


def _multi(x: Tensor, t: Tensor) -> bool:
    """Whether ``t`` carries several tangents per row: ``[B, K, *event]`` against ``x``'s ``[B, *event]``."""
    return t.dim() == x.dim() + 1


def _per_row(a: Tensor, t: Tensor) -> Tensor:
    """``a`` (``[B, F]``) broadcast against ``t`` (``[B, F]`` or ``[B, K, F]``)."""
    return a if a.dim() == t.dim() else a.unsqueeze(1)


def _zero_tangent(c: Tensor, t: Tensor) -> Tensor:
    return torch.zeros(*t.shape[:-1], c.shape[-1], dtype=t.dtype, device=t.device)


def _generic(module: nn.Module, x: Tensor, t: Tensor, c: Tensor | None) -> Dual:
    if _multi(x, t):
        raise Unsupported(type(module).__name__)
    with fwAD.dual_level():
        out = module(fwAD.make_dual(x, t)) if c is None else module(fwAD.make_dual(x, t), c)
        y, ty = fwAD.unpack_dual(out)
    if ty is None:  # the output does not depend on x
        ty = torch.zeros_like(y)
    return y, ty


def _linear(m: nn.Linear, x: Tensor, t: Tensor, c: Tensor | None) -> Dual:
    return F.linear(x, m.weight, m.bias), F.linear(t, m.weight)


def _silu(m: nn.Module, x: Tensor, t: Tensor, c: Tensor | None) -> Dual:
    s = torch.sigmoid(x)
    y = x * s
    return y, t * _per_row(torch.addcmul(s, y, 1 - s), t)


def _tanh(m: nn.Module, x: Tensor, t: Tensor, c: Tensor | None) -> Dual:
    y = torch.tanh(x)
    return y, t * _per_row(1 - y * y, t)


def _identity(m: nn.Module, x: Tensor, t: Tensor, c: Tensor | None) -> Dual:
    return x, t


def _sequential(m: nn.Sequential, x: Tensor, t: Tensor, c: Tensor | None) -> Dual:
    for layer in m:
        x, t = _dual(layer, x, t, None)
    return x, t


def _residual_block(m: ResidualBlock, x: Tensor, t: Tensor, c: Tensor | None) -> Dual:
    if c is None:
        r, tr = _dual(m.branch, x, t, None)
    else:
        r, tr = _dual(m.branch, torch.cat([x, c], dim=-1), torch.cat([t, _zero_tangent(c, t)], dim=-1), None)
    return x + r, t + tr


def _resnet(m: ResNet, x: Tensor, t: Tensor, c: Tensor | None) -> Dual:
    if (c is None) != (m.condition_dim == 0) or x.reshape(x.shape[0], -1).shape[1] != m.features:
        return _generic(m, x, t, c)  # let ResNet.forward raise its own error
    lead = t.shape[: t.dim() - x.dim() + 1]  # (B,) or (B, K)
    h, th = x.reshape(x.shape[0], -1), t.reshape(*lead, -1)
    for block in m.blocks:
        h, th = _residual_block(block, h, th, c)
    return h.reshape(x.shape), th.reshape(t.shape)


_HANDLERS: dict[type, Callable[..., Dual]] = {
    nn.Linear: _linear,
    nn.SiLU: _silu,
    nn.Tanh: _tanh,
    nn.Identity: _identity,
    nn.Sequential: _sequential,
    ResidualBlock: _residual_block,
    ResNet: _resnet,
}


def _dual(module: nn.Module, x: Tensor, t: Tensor, c: Tensor | None) -> Dual:
    handler = _HANDLERS.get(type(module), _generic)
    return handler(module, x, t, c)


def dual_forward(net: nn.Module, x: Tensor, t: Tensor, c: Tensor | None = None, takes_c: bool = True) -> Dual:
    r"""A network's output and its forward-mode tangent, :math:`(f(x),\ J_f(x)\,t)`, in one
    pass; both are differentiable in the network's parameters.

    The condition rule is that of :func:`freeflows.conditioning.call_with_condition`; the
    condition's tangent is zero.

    Args:
        net: the network :math:`f`.
        x: inputs ``[B, *event]``.
        t: tangents, shaped like ``x`` (one per row) or ``[B, K, *event]`` (``K`` per row, e.g. a
            basis for a full Jacobian); the latter works only for networks made of the modules
            listed in the module docstring.
        c: conditions ``[B, C]``, or ``None``.
        takes_c: whether ``net`` takes ``c`` itself; otherwise it sees ``[x, c]`` concatenated.

    Returns:
        ``(f(x), J_f(x) t)``, the second shaped like ``t``.

    Raises:
        Unsupported: for ``K`` tangents per row through a module without a structured rule.

    Example:
        >>> import torch
        >>> from freeflows.tangents import dual_forward
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
        >>> x, t = torch.randn(4, 3), torch.randn(4, 3)
        >>> y, jt = dual_forward(net, x, t)
        >>> _, expected = torch.func.jvp(net, (x,), (t,))
        >>> torch.allclose(y, net(x), atol=1e-6), torch.allclose(jt, expected, atol=1e-6)
        (True, True)
    """
    if c is None or takes_c:
        return _dual(net, x, t, c)
    lead = t.shape[: t.dim() - x.dim() + 1]
    flat_t = t.reshape(*lead, -1)
    y, ty = _dual(
        net,
        torch.cat([x.reshape(x.shape[0], -1), c], dim=-1),
        torch.cat([flat_t, _zero_tangent(c, flat_t)], dim=-1),
        None,
    )
    if y.numel() == x.numel():
        y, ty = y.reshape(x.shape), ty.reshape(t.shape)
    return y, ty


def value_and_jacobian(
    net: nn.Module, x: Tensor, c: Tensor | None = None, takes_c: bool = True
) -> tuple[Tensor, Tensor]:
    """A network's value and per-row Jacobians by one structured forward pass that carries the
    ``D`` basis vectors as tangents.

    Args:
        net: a network made of the modules listed in the module docstring.
        x: inputs ``[B, *event]``.
        c: conditions ``[B, C]``, or ``None``.
        takes_c: whether ``net`` takes ``c`` itself; otherwise it sees ``[x, c]`` concatenated.

    Returns:
        ``(net(x), J)``, ``[B, *event]`` and ``[B, D, D]``.

    Raises:
        Unsupported: for other networks.

    Example:
        >>> import torch
        >>> from freeflows.tangents import value_and_jacobian
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(5, 2)
        >>> value, jac = value_and_jacobian(net, x)
        >>> expected = torch.func.vmap(torch.func.jacrev(net))(x)
        >>> torch.allclose(value, net(x), atol=1e-6), torch.allclose(jac, expected, atol=1e-6)
        (True, True)
    """
    batch, event = x.shape[0], tuple(x.shape[1:])
    dim = x[0].numel()
    basis = torch.eye(dim, dtype=x.dtype, device=x.device).reshape(dim, *event)
    value, cols = dual_forward(net, x, basis.expand(batch, dim, *event), c, takes_c)
    return value, cols.reshape(batch, dim, -1).transpose(1, 2)


def jacobian(net: nn.Module, x: Tensor, c: Tensor | None = None, takes_c: bool = True) -> Tensor:
    """Per-row Jacobians of a network by one structured forward pass (the second output of
    :func:`value_and_jacobian`).

    Args:
        net: a network made of the modules listed in the module docstring.
        x: inputs ``[B, *event]``.
        c: conditions ``[B, C]``, or ``None``.
        takes_c: whether ``net`` takes ``c`` itself; otherwise it sees ``[x, c]`` concatenated.

    Returns:
        ``[B, D, D]``.

    Raises:
        Unsupported: for other networks.

    Example:
        >>> import torch
        >>> from freeflows.nets import ResNet
        >>> from freeflows.tangents import jacobian
        >>> net = ResNet(3, hidden=8, condition_dim=1)
        >>> jacobian(net, torch.randn(4, 3), torch.randn(4, 1)).shape
        torch.Size([4, 3, 3])
    """
    return value_and_jacobian(net, x, c, takes_c)[1]
