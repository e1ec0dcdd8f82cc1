r"""Input checks and batch shapes shared by every model, written once.

Every check raises :class:`ValueError` with one line naming the problem. The shape rules of the
model contract (:mod:`freeflows.contract`) live here:

* **Data.** ``x`` has shape ``[*batch, *event]``; any number of leading batch dimensions, none
  included. Models compute on ``[B, *event]`` with ``B`` the product of the batch dimensions.
* **Conditions.** An unconditional model (``condition_dim`` is ``None``) refuses any ``c``; a
  conditional one requires it, with shape ``[*cbatch, C]``. For densities, ``cbatch`` broadcasts
  against ``x``'s batch shape (so ``[C]`` conditions every row, ``[*batch, C]`` each row). For
  draws, ``sample(n, c)`` gives ``[n, *cbatch, *event]``: ``n`` draws for each condition.
* **Dtype and device** of ``x`` and ``c`` must be those of the model (of its first floating
  parameter or buffer); a mismatch names both.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def numel(shape: tuple[int, ...]) -> int:
    """The number of elements of a tensor of shape ``shape`` (``1`` for ``()``).

    Args:
        shape: a shape.

    Example:
        >>> from freeflows.checks import numel
        >>> numel((3, 4)), numel(())
        (12, 1)
    """
    return int(math.prod(shape))


def module_dtype_device(module: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    """The dtype and device of a module's first floating parameter (else buffer).

    Args:
        module: any module.

    Returns:
        ``(dtype, device)``, or ``(None, None)`` when the module has no floating tensor.

    Example:
        >>> import torch
        >>> from freeflows.checks import module_dtype_device
        >>> module_dtype_device(torch.nn.Linear(2, 2).double())
        (torch.float64, device(type='cpu'))
        >>> module_dtype_device(torch.nn.ReLU())
        (None, None)
    """
    for tensors in (module.parameters(), module.buffers()):
        for t in tensors:
            if t.is_floating_point():
                return t.dtype, t.device
    return None, None


def _check_tensor(t: object, name: str, dtype: torch.dtype | None, device: torch.device | None) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(
            f"{name} has dtype {t.dtype} but the model is {dtype}: "
            f"convert {name} with .to({dtype}) or the model with .to({t.dtype})"
        )
    if device is not None and t.device != device:
        raise ValueError(
            f"{name} is on device {t.device} but the model is on {device}: "
            f"move {name} with .to('{device}') or the model with .to('{t.device}')"
        )


def _check_finite(t: Tensor, name: str, batch: tuple[int, ...]) -> None:
    if bool(torch.isfinite(t).all()):
        return
    rows = t.reshape(numel(batch), -1) if batch else t.reshape(1, -1)
    bad = (~torch.isfinite(rows)).any(dim=1).nonzero().flatten()
    kinds = [k for k, f in (("NaN", torch.isnan), ("inf", torch.isinf)) if bool(f(t).any())]
    if len(batch) <= 1:
        where = f"row {int(bad[0])}"
    else:
        where = f"index {tuple(int(i) for i in torch.unravel_index(bad[0], batch))}"
    raise ValueError(f"{name} contains {' and '.join(kinds)} in {bad.numel()} row(s), first at {where}")


def check_count(n: object) -> int:
    """``n`` as a positive ``int``, the number of draws of ``sample(n)``.

    Args:
        n: any object; integers and integer-like objects (``operator.index``) pass.

    Raises:
        ValueError: unless ``n`` is an integer ``>= 1`` (a ``bool`` is refused).

    Example:
        >>> from freeflows.checks import check_count
        >>> check_count(5)
        5
        >>> check_count(0)
        Traceback (most recent call last):
            ...
        ValueError: n must be a positive integer, got 0
    """
    try:
        value = operator.index(n)  # type: ignore[arg-type]
    except TypeError:
        value = 0
    if isinstance(n, bool) or value < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return value


def check_condition_dim(condition_dim: object) -> int | None:
    """``condition_dim`` as a positive ``int`` or ``None`` (an unconditional model).

    Args:
        condition_dim: the value given to a model's constructor.

    Raises:
        ValueError: for anything else (``0``, negative numbers, floats, ``bool``).

    Example:
        >>> from freeflows.checks import check_condition_dim
        >>> check_condition_dim(3), check_condition_dim(None)
        (3, None)
        >>> check_condition_dim(0)
        Traceback (most recent call last):
            ...
        ValueError: condition_dim must be a positive integer or None, got 0
    """
    if condition_dim is not None and (
        isinstance(condition_dim, bool) or not isinstance(condition_dim, int) or condition_dim < 1
    ):
        raise ValueError(f"condition_dim must be a positive integer or None, got {condition_dim!r}")
    return condition_dim


def check_condition(
    c: Tensor | None,
    condition_dim: int | None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Tensor | None:
    """Check a condition against a model's ``condition_dim``, dtype and device.

    Args:
        c: conditions ``[*cbatch, C]``, or ``None``.
        condition_dim: the model's ``C``, or ``None`` for an unconditional model.
        dtype: the model's dtype, or ``None`` to accept any floating dtype.
        device: the model's device, or ``None`` to accept any.

    Returns:
        ``c`` unchanged.

    Raises:
        ValueError: one line naming the problem (a missing or unexpected condition, the wrong
            size, dtype or device, or a non-finite value).

    Example:
        >>> import torch
        >>> from freeflows.checks import check_condition
        >>> check_condition(torch.zeros(4, 2), 2).shape
        torch.Size([4, 2])
        >>> check_condition(None, 2)
        Traceback (most recent call last):
            ...
        ValueError: this model is conditional: pass c with 2 features
    """
    if condition_dim is None:
        if c is not None:
            raise ValueError("a condition c was given, but this model is unconditional")
        return None
    if c is None:
        raise ValueError(f"this model is conditional: pass c with {condition_dim} features")
    _check_tensor(c, "c", dtype, device)
    if c.dim() == 0 or c.shape[-1] != condition_dim:
        raise ValueError(
            f"c has shape {tuple(c.shape)}, expected [{condition_dim}] or [*batch, {condition_dim}]"
        )
    _check_finite(c, "c", tuple(c.shape[:-1]))
    return c


def check_inputs(
    x: Tensor,
    c: Tensor | None,
    event_shape: tuple[int, ...],
    condition_dim: int | None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor | None, torch.Size]:
    """Check data and its condition, and flatten the batch.

    Args:
        x: data ``[*batch, *event]``.
        c: conditions ``[*cbatch, C]`` with ``cbatch`` broadcastable to ``batch``, or ``None``.
        event_shape: the model's event shape.
        condition_dim: the model's ``C``, or ``None``.
        dtype: the model's dtype, or ``None`` to accept any floating dtype.
        device: the model's device, or ``None`` to accept any.

    Returns:
        ``(x, c, batch)``: ``x`` as ``[B, *event]``, ``c`` as ``[B, C]`` (or ``None``), and the
        batch shape (``x``'s, broadcast with ``c``'s), whose product is ``B``.

    Raises:
        ValueError: one line naming the problem.

    Example:
        >>> import torch
        >>> from freeflows.checks import check_inputs
        >>> x, c, batch = check_inputs(torch.zeros(5, 2), torch.zeros(3, 1, 4), (2,), 4)
        >>> x.shape, c.shape, batch
        (torch.Size([15, 2]), torch.Size([15, 4]), torch.Size([3, 5]))
    """
    _check_tensor(x, "x", dtype, device)
    event = tuple(event_shape)
    k = x.dim() - len(event)
    if k < 0 or tuple(x.shape[k:]) != event:
        dims = ", ".join(map(str, event))
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [*batch, {dims}] (event shape {event})")
    batch = x.shape[:k]
    _check_finite(x, "x", tuple(batch))
    c = check_condition(c, condition_dim, dtype, device)
    if c is not None:
        try:
            full = torch.broadcast_shapes(batch, c.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"c has batch shape {tuple(c.shape[:-1])}, which does not broadcast with x's batch "
                f"shape {tuple(batch)}: pass c of shape [{condition_dim}] or [*batch, {condition_dim}]"
            ) from None
        if full != batch:
            x = x.expand(*full, *event)
            batch = full
        c = c.expand(*full, c.shape[-1]).reshape(-1, c.shape[-1])
    return x.reshape(-1, *event), c, batch


def draw_conditions(
    n: object,
    c: Tensor | None,
    condition_dim: int | None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> tuple[int, Tensor | None, torch.Size]:
    """The rows to draw for ``sample(n, c)``: ``n`` draws for each condition.

    Args:
        n: the number of draws per condition.
        c: conditions ``[*cbatch, C]``, or ``None``.
        condition_dim: the model's ``C``, or ``None``.
        dtype: the model's dtype, or ``None`` to accept any floating dtype.
        device: the model's device, or ``None`` to accept any.

    Returns:
        ``(rows, c_rows, lead)``: the number of rows, ``n`` times the number of conditions; the
        condition of each row, ``[rows, C]`` (all conditions in turn, ``n`` times) or ``None``;
        and the leading shape ``[n, *cbatch]`` that the draws take.

    Example:
        >>> import torch
        >>> from freeflows.checks import draw_conditions
        >>> rows, c_rows, lead = draw_conditions(5, torch.zeros(3, 2), 2)
        >>> rows, c_rows.shape, lead
        (15, torch.Size([15, 2]), torch.Size([5, 3]))
    """
    n = check_count(n)
    c = check_condition(c, condition_dim, dtype, device)
    if c is None:
        return n, None, torch.Size([n])
    cbatch = c.shape[:-1]
    rows = c.reshape(-1, c.shape[-1]).repeat(n, 1)
    return rows.shape[0], rows, torch.Size([n, *cbatch])


def check_options(kind: str, options: Iterable[str], valid: Iterable[str]) -> None:
    """Raise :class:`ValueError` naming any option of a model outside ``valid``.

    Args:
        kind: the model's name, for the message.
        options: the names of the options given.
        valid: the names of the options that the model takes.

    Example:
        >>> from freeflows.checks import check_options
        >>> check_options("CNF", ["rtol"], ["rtol", "atol"])
        >>> check_options("CNF", ["rtl"], ["rtol", "atol"])
        Traceback (most recent call last):
            ...
        ValueError: unknown option(s) rtl for CNF; valid options: rtol, atol
    """
    valid = list(valid)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {kind}; valid options: {', '.join(valid)}"
        )
