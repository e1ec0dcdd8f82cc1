r"""The one model contract that every density model in freeflows follows.

Every model is a :class:`torch.nn.Module` with these methods:

* ``log_prob(x, c=None) -> Tensor[*batch]``: the log-density (nats) of ``x`` of shape
  ``[*batch, *event]`` under the distribution that ``sample`` draws from; it integrates to one.
  A value that is not normalised (the free-form papers' formula) is only ever returned under its
  own name (``FreeFormFlow.log_prob(x, variant="paper")``);
* ``sample(n, c=None) -> Tensor[n, *cbatch, *event]``: draws from the model, never with a graph;
  ``rsample`` gives reparametrised draws with gradients wherever the draw is reparametrisable;
* ``sample_and_log_prob(n, c=None) -> (Tensor[n, *cbatch, *event], Tensor[n, *cbatch])``: draws
  and the exact log-density of each under the distribution that drew it (for importance weights);
* ``loss(x, c=None) -> Loss``: the training objective of a batch.

**Shapes.** A condition's size is declared once, as the model's ``condition_dim``. ``c`` of shape
``[C]`` conditions every draw, and ``sample(n, c)`` returns ``[n, *event]``; with ``c`` of shape
``[B, C]`` it returns ``[n, B, *event]``, ``n`` draws for each condition. ``log_prob(x, c)``
accepts any leading batch shape, with ``c`` of shape ``[C]`` or broadcastable to ``[*batch, C]``.

**Dtype and device** follow the module: data or conditions of another dtype or device are a
:class:`ValueError` naming both.

Direction convention, stated once for the whole library: **forward maps data to latent**
(:math:`z = f(x)`), and **inverse maps latent to data** (:math:`x = f^{-1}(z)`).

:class:`DensityModule` implements these public methods once, on top of four methods that each
model writes for flat batches (``[B, *event]`` and conditions ``[B, C]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .checks import check_inputs, draw_conditions, module_dtype_device


@dataclass
class Loss:
    """A training objective: ``value`` is the scalar to minimise, ``parts`` are detached scalars
    to log (for example ``nll`` and ``reconstruction``)."""

    value: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


class NumericalError(ArithmeticError):
    """A model could not compute a finite result for this input, for example because an adaptive
    ODE solve failed (its step size underflowed, or it took more than the allowed steps). The
    training runner treats it in ``loss`` like a non-finite loss: the batch is skipped and counted."""


@runtime_checkable
class DensityModel(Protocol):
    """Structural type of every freeflows model (and of any model the tool can train)."""

    def log_prob(self, x: Tensor, c: Tensor | None = None) -> Tensor: ...

    def sample(self, n: int, c: Tensor | None = None) -> Tensor: ...

    def sample_and_log_prob(self, n: int, c: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    def loss(self, x: Tensor, c: Tensor | None = None) -> Loss: ...


class DensityModule(nn.Module):
    r"""Base class of every freeflows model: the contract's public methods, with the input checks
    and the batch and condition shapes handled here, once.

    A subclass sets ``event_shape`` and ``condition_dim`` and implements, on flat batches (rows
    ``[B, *event]``, conditions ``[B, C]`` or ``None``, all already checked):

    * ``_log_prob(x, c, **options) -> Tensor[B]``;
    * ``_rsample(n, c, generator) -> Tensor[n, *event]`` (with gradients; raise if the draw is
      not reparametrisable);
    * ``_sample(n, c, generator)`` (run under ``no_grad``; defaults to ``_rsample``);
    * ``_sample_and_log_prob(n, c, generator) -> (Tensor[n, *event], Tensor[n])``;
    * ``_loss(x, c) -> Loss``.

    A subclass whose public method takes extra keywords (``FreeFormFlow.log_prob(variant=...)``)
    overrides it with that signature and calls :meth:`_per_row` or :meth:`_draw`.

    ``_settings`` names attributes that users may change after construction (for example a
    free-form flow's ``sample_refine_steps``); :func:`freeflows.save` stores their values.
    """

    event_shape: tuple[int, ...]
    condition_dim: int | None
    _settings: ClassVar[tuple[str, ...]] = ()
    #: ``(constructor name, arguments)`` recorded by a named constructor, for :func:`freeflows.save`.
    _constructor: tuple[str, dict[str, Any]] | None = None

    # -- the plumbing ---------------------------------------------------------------------------
    def _check(self, x: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None, torch.Size]:
        """``x`` as ``[B, *event]``, ``c`` as ``[B, C]`` or ``None``, and the batch shape."""
        dtype, device = module_dtype_device(self)
        return check_inputs(x, c, self.event_shape, self.condition_dim, dtype, device)

    def _per_row(self, fn: Callable[..., Tensor], x: Tensor, c: Tensor | None, **options: Any) -> Tensor:
        """``fn(x, c, **options)`` on the flattened batch, returned with the batch shape."""
        x, c, batch = self._check(x, c)
        if x.shape[0] == 0:
            return x.new_empty(batch)
        out = fn(x, c, **options)
        return out.reshape((*batch, *out.shape[1:]))

    def _draw(
        self,
        fn: Callable[..., Tensor | tuple[Tensor, ...]],
        n: int,
        c: Tensor | None,
        generator: torch.Generator | None,
        **options: Any,
    ) -> Any:
        """``fn(rows, c_rows, generator, **options)`` for ``n`` draws per condition; every output
        is returned with leading shape ``[n, *cbatch]``."""
        dtype, device = module_dtype_device(self)
        rows, c_rows, lead = draw_conditions(n, c, self.condition_dim, dtype, device)
        out = fn(rows, c_rows, generator, **options)
        if isinstance(out, Tensor):
            return out.reshape((*lead, *out.shape[1:]))
        return tuple(t.reshape((*lead, *t.shape[1:])) for t in out)

    # -- the contract ---------------------------------------------------------------------------
    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x, c)

    def log_prob(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Log-density ``[*batch]`` of ``x`` (``[*batch, *event]``) given ``c`` (``[C]`` or
        broadcastable to ``[*batch, C]``)."""
        return self._per_row(self._log_prob, x, c)

    def rsample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Like :meth:`sample`, with gradients to the parameters (reparametrised draws)."""
        return self._draw(self._rsample, n, c, generator)

    @torch.no_grad()
    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws ``[n, *event]``, or ``[n, *cbatch, *event]`` with ``c`` of shape
        ``[*cbatch, C]`` (``n`` draws for each condition). No gradients (see :meth:`rsample`)."""
        return self._draw(self._sample, n, c, generator)

    @torch.no_grad()
    def sample_and_log_prob(
        self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draws as :meth:`sample` and the exact log-density of each, ``[n, *cbatch]``."""
        return self._draw(self._sample_and_log_prob, n, c, generator)

    def loss(self, x: Tensor, c: Tensor | None = None) -> Loss:
        """The training objective of a batch ``[*batch, *event]`` (a mean over all rows)."""
        x, c, _ = self._check(x, c)
        return self._loss(x, c)

    # -- what each model implements -------------------------------------------------------------
    def _log_prob(self, x: Tensor, c: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _rsample(
        self, n: int, c: Tensor | None, generator: torch.Generator | None
    ) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _sample(self, n: int, c: Tensor | None, generator: torch.Generator | None) -> Tensor:
        return self._rsample(n, c, generator)

    def _sample_and_log_prob(
        self, n: int, c: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _loss(self, x: Tensor, c: Tensor | None) -> Loss:  # pragma: no cover
        raise NotImplementedError
