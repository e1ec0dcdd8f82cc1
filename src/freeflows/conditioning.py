"""How a network receives a condition ``c``: passed as ``net(x, c)`` when its ``forward`` has a
parameter named ``c``, otherwise concatenated to the flattened input, ``net([x, c])``."""

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
