"""How a network receives a condition ``c``: passed as ``net(x, c)`` when its ``forward`` has a
parameter named ``c``, otherwise concatenated to the flattened input, ``net([x, c])``; and how a
model checks that its networks take conditions of the size it declares."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def accepts_condition(net: nn.Module) -> bool:
    """Whether ``net.forward`` takes a parameter named ``c``."""
    try:
        return "c" in inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return False


def call_with_condition(net: nn.Module, x: Tensor, c: Tensor | None, takes_c: bool) -> Tensor:
    """Evaluate ``net`` on ``x`` given ``c`` following the rule above."""
    if c is None:
        return net(x)
    if takes_c:
        return net(x, c=c)
    out = net(torch.cat([x.reshape(x.shape[0], -1), c], dim=-1))
    return out.reshape(x.shape) if out.numel() == x.numel() else out


#: A network that does not say how many condition features it takes.
UNDECLARED = "undeclared"


def declared_condition_dim(net: nn.Module) -> int | None | str:
    """The condition size a network declares: its ``condition_dim`` attribute (``0`` meaning
    none, returned as ``None``), or :data:`UNDECLARED`."""
    value = getattr(net, "condition_dim", None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value or None
    return UNDECLARED


def resolve_condition_dim(condition_dim: int | None, nets: dict[str, nn.Module]) -> int | None:
    """The model's condition size, declared once: ``condition_dim`` if given, else the size that
    the networks declare (``None`` if they declare none). Any network that declares a different
    size is a :class:`ValueError`, so that a mismatch never builds."""
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
