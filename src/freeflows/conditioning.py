"""How a network receives a condition ``c``: passed as ``net(x, c)`` when its ``forward`` has a
parameter named ``c``, otherwise concatenated to the flattened input, ``net([x, c])``; and how a
model checks that its networks take conditions of the size it declares."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def accepts_condition(net: nn.Module) -> bool:
    """Whether ``net.forward`` takes a parameter named ``c``.

    Args:
        net: any module.

    Example:
        >>> import torch
        >>> from freeflows.conditioning import accepts_condition
        >>> from freeflows.nets import ResNet
        >>> accepts_condition(ResNet(2)), accepts_condition(torch.nn.Linear(2, 2))
        (True, False)
    """
    try:
        return "c" in inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return False


def call_with_condition(net: nn.Module, x: Tensor, c: Tensor | None, takes_c: bool) -> Tensor:
    """Evaluate ``net`` on ``x`` given ``c``, following the rule of the module docstring.

    Args:
        net: the network.
        x: inputs ``[B, *event]``.
        c: conditions ``[B, C]``, or ``None`` (then ``net(x)``).
        takes_c: whether ``net`` takes ``c`` itself (:func:`accepts_condition`); otherwise it
            sees the flattened input and ``c`` concatenated, ``[B, D + C]``.

    Returns:
        ``net``'s output, reshaped like ``x`` when it has as many elements.

    Example:
        >>> import torch
        >>> from freeflows.conditioning import call_with_condition
        >>> net = torch.nn.Linear(2 + 1, 2)  # sees [x, c]
        >>> call_with_condition(net, torch.randn(4, 2), torch.randn(4, 1), takes_c=False).shape
        torch.Size([4, 2])
    """
    if c is None:
        return net(x)
    if takes_c:
        return net(x, c=c)
    out = net(torch.cat([x.reshape(x.shape[0], -1), c], dim=-1))
    return out.reshape(x.shape) if out.numel() == x.numel() else out


#: A network that does not say how many condition features it takes.
UNDECLARED = "undeclared"


def declared_condition_dim(net: nn.Module) -> int | None | str:
    """The condition size that a network declares.

    Args:
        net: any module.

    Returns:
        Its ``condition_dim`` attribute (``0`` meaning none, returned as ``None``), or
        :data:`UNDECLARED` when it has no integer ``condition_dim``.

    Example:
        >>> import torch
        >>> from freeflows.conditioning import declared_condition_dim
        >>> from freeflows.nets import ResNet
        >>> declared_condition_dim(ResNet(2, condition_dim=3)), declared_condition_dim(ResNet(2))
        (3, None)
        >>> declared_condition_dim(torch.nn.Linear(2, 2))
        'undeclared'
    """
    value = getattr(net, "condition_dim", None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value or None
    return UNDECLARED


def resolve_condition_dim(condition_dim: int | None, nets: dict[str, nn.Module]) -> int | None:
    """A model's condition size, declared once.

    Args:
        condition_dim: the size given to the model, or ``None``.
        nets: the model's networks by name (the names appear in errors).

    Returns:
        ``condition_dim`` if given, else the size that the networks declare (``None`` if they
        declare none).

    Raises:
        ValueError: if a network declares a different size, so that a mismatch never builds.

    Example:
        >>> from freeflows.conditioning import resolve_condition_dim
        >>> from freeflows.nets import ResNet
        >>> resolve_condition_dim(None, {"encoder": ResNet(2, condition_dim=3)})
        3
        >>> resolve_condition_dim(2, {"encoder": ResNet(2, condition_dim=3)})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: condition_dim=2, but the encoder network was built for 3 condition features...
    """
    declared = {name: declared_condition_dim(net) for name, net in nets.items()}
    known = {name: d for name, d in declared.items() if d != UNDECLARED}
    sizes = set(known.values())
    if condition_dim is None:
        if len(sizes) > 1:
            shown = ", ".join(f"the {name} {d or 0}" for name, d in known.items())
            raise ValueError(f"the networks take conditions of different sizes ({shown})")
        return next(iter(sizes)) if sizes else None
    for name, d in known.items():
        if d != condition_dim:
            raise ValueError(
                f"condition_dim={condition_dim}, but the {name} network was built for "
                f"{d or 0} condition features: build it with the same size"
            )
    return condition_dim
