"""Input checks shared by every model. Each raises :class:`ValueError` naming the problem."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


def check_data(x: Tensor, event_shape: tuple[int, ...], name: str = "x") -> None:
    """Check that ``x`` is a finite floating tensor of shape ``[B, *event_shape]``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if tuple(x.shape[1:]) != tuple(event_shape) or x.dim() != len(event_shape) + 1:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, expected [batch, {', '.join(map(str, event_shape))}]"
            f" (event shape {tuple(event_shape)})"
        )
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(dim=1).nonzero().flatten()
        kinds = []
        if torch.isnan(x).any():
            kinds.append("NaN")
        if torch.isinf(x).any():
            kinds.append("inf")
        raise ValueError(
            f"{name} contains {' and '.join(kinds)} in {bad.numel()} row(s), first at row {bad[0].item()}"
        )


def check_condition(c: Tensor | None, condition_dim: int | None, batch: int | None) -> Tensor | None:
    """Check a condition against the model's ``condition_dim`` and return it as ``[B, C]``.

    Shape rules, written once for the whole library:

    * an unconditional model (``condition_dim`` is ``None``) refuses any ``c``;
    * a conditional model requires ``c``;
    * ``c`` of shape ``[C]`` is broadcast to every row; ``c`` of shape ``[B, C]`` gives one
      condition per row and ``B`` must match the batch.
    """
    if condition_dim is None:
        if c is not None:
            raise ValueError("a condition c was given, but this model is unconditional")
        return None
    if c is None:
        raise ValueError(f"this model is conditional: pass c with {condition_dim} features")
    if not isinstance(c, Tensor) or not c.is_floating_point():
        raise ValueError("c must be a floating-point torch.Tensor")
    if c.dim() == 1:
        c = c.unsqueeze(0)
        if batch is not None:
            c = c.expand(batch, -1)
    if c.dim() != 2 or c.shape[1] != condition_dim:
        raise ValueError(
            f"c has shape {tuple(c.shape)}, expected [{condition_dim}] or [batch, {condition_dim}]"
        )
    if batch is not None and c.shape[0] != batch:
        raise ValueError(f"c has {c.shape[0]} rows but x has {batch}")
    if not torch.isfinite(c).all():
        raise ValueError("c contains NaN or inf")
    return c


def check_options(kind: str, options: Iterable[str], valid: Iterable[str]) -> None:
    """Raise :class:`ValueError` naming any option of a model ``kind`` outside ``valid``."""
    valid = list(valid)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {kind}; valid options: {', '.join(valid)}"
        )


def numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))
