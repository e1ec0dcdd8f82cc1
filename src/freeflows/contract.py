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
    """A training objective of a batch, as returned by every model's ``loss``.

    Args:
        value: the scalar to minimise (with a graph).
        parts: detached scalars to log (for example ``nll`` and ``reconstruction``).

    Example:
        >>> import torch, freeflows as ff
        >>> loss = ff.RealNVP(2).loss(torch.randn(16, 2))
        >>> loss.value.shape, loss.value.requires_grad, sorted(loss.parts)
        (torch.Size([]), True, ['nll'])
    """

    value: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


class NumericalError(ArithmeticError):
    """A model could not compute a finite result for this input, for example because an adaptive
    ODE solve failed (its step size underflowed, or it took more than the allowed steps). The
    training runner treats it in ``loss`` like a non-finite loss: the batch is skipped and counted.

    Example:
        >>> from freeflows.contract import NumericalError
        >>> try:
        ...     raise NumericalError("the ODE solve failed")
        ... except ArithmeticError as err:
        ...     print(type(err).__name__, err)
        NumericalError the ODE solve failed
    """


@runtime_checkable
class DensityModel(Protocol):
    """Structural type of every freeflows model (and of any model the tool can train): the four
    methods of the contract (see the module docstring).

    Example:
        >>> import freeflows as ff
        >>> isinstance(ff.RealNVP(2), ff.DensityModel), isinstance(ff.StandardNormal(2), ff.DensityModel)
        (True, False)
    """

    def log_prob(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Log-density ``[*batch]`` of ``x`` given ``c`` (see :meth:`DensityModule.log_prob`).

        Args:
            x: data ``[*batch, *event]``.
            c: conditions ``[C]`` or broadcastable to ``[*batch, C]``, or ``None``.
        """
        ...

    def sample(self, n: int, c: Tensor | None = None) -> Tensor:
        """``n`` draws ``[n, *cbatch, *event]`` without a graph (see :meth:`DensityModule.sample`).

        Args:
            n: draws per condition.
            c: conditions ``[*cbatch, C]``, or ``None``.
        """
        ...

    def sample_and_log_prob(self, n: int, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Draws as ``sample`` and the exact log-density of each, ``[n, *cbatch]`` (see
        :meth:`DensityModule.sample_and_log_prob`).

        Args:
            n: draws per condition.
            c: conditions ``[*cbatch, C]``, or ``None``.
        """
        ...

    def loss(self, x: Tensor, c: Tensor | None = None) -> Loss:
        """The training objective of a batch (see :meth:`DensityModule.loss`).

        Args:
            x: data ``[*batch, *event]``.
            c: conditions ``[C]`` or broadcastable to ``[*batch, C]``, or ``None``.
        """
        ...


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

    Example:
        >>> import math, torch
        >>> from freeflows import DensityModule, Loss
        >>> class Gaussian(DensityModule):  # N(loc, I) on vectors of d numbers
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.event_shape, self.condition_dim = (d,), None
        ...         self.loc = torch.nn.Parameter(torch.zeros(d))
        ...     def _log_prob(self, x, c):
        ...         return -0.5 * (x - self.loc).square().sum(1) - 0.5 * len(self.loc) * math.log(2 * math.pi)
        ...     def _rsample(self, n, c, generator):
        ...         return self.loc + torch.randn(n, len(self.loc), generator=generator)
        ...     def _sample_and_log_prob(self, n, c, generator):
        ...         x = self._rsample(n, c, generator)
        ...         return x, self._log_prob(x, c)
        ...     def _loss(self, x, c):
        ...         nll = -self._log_prob(x, c).mean()
        ...         return Loss(nll, {"nll": nll.detach()})
        >>> model = Gaussian(2)
        >>> model.log_prob(torch.zeros(3, 4, 2)).shape  # any batch shape
        torch.Size([3, 4])
        >>> model.sample(5).shape, model.sample(5).requires_grad, model.rsample(5).requires_grad
        (torch.Size([5, 2]), False, True)
        >>> model.log_prob(torch.zeros(2, 2, dtype=torch.float64))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: x has dtype torch.float64 but the model is torch.float32: convert x with ...
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
        """Same as :meth:`log_prob`, so that ``model(x, c)`` is the log-density.

        Args:
            x: data ``[*batch, *event]``.
            c: conditions ``[C]`` or broadcastable to ``[*batch, C]``; ``None`` for an
                unconditional model.

        Returns:
            ``[*batch]``.
        """
        return self.log_prob(x, c)

    def log_prob(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Log-density (nats) of ``x`` under the distribution that :meth:`sample` draws from.

        Args:
            x: data ``[*batch, *event]``, any number of batch dimensions.
            c: conditions ``[C]`` (the same for every row) or broadcastable to ``[*batch, C]``;
                ``None`` for an unconditional model.

        Returns:
            ``[*batch]``.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.RealNVP(2, condition_dim=3)
            >>> flow.log_prob(torch.randn(7, 5, 2), torch.randn(3)).shape
            torch.Size([7, 5])
        """
        return self._per_row(self._log_prob, x, c)

    def rsample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Like :meth:`sample`, with gradients to the parameters (reparametrised draws).

        Args:
            n: draws per condition.
            c: conditions ``[*cbatch, C]``, or ``None``.
            generator: random number generator, for reproducible draws.

        Returns:
            ``[n, *cbatch, *event]``.

        Example:
            >>> import torch, freeflows as ff
            >>> x = ff.RealNVP(2).rsample(4)
            >>> x.shape, x.requires_grad
            (torch.Size([4, 2]), True)
        """
        return self._draw(self._rsample, n, c, generator)

    @torch.no_grad()
    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Draws from the model, without gradients (see :meth:`rsample`).

        Args:
            n: draws per condition.
            c: conditions ``[*cbatch, C]`` (``n`` draws for each), or ``None``.
            generator: random number generator, for reproducible draws.

        Returns:
            ``[n, *event]``, or ``[n, *cbatch, *event]`` with a condition.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.RealNVP(2, condition_dim=3)
            >>> flow.sample(5, torch.randn(3)).shape, flow.sample(5, torch.randn(4, 3)).shape
            (torch.Size([5, 2]), torch.Size([5, 4, 2]))
            >>> gen = lambda: torch.Generator().manual_seed(0)
            >>> torch.equal(flow.sample(5, torch.ones(3), gen()), flow.sample(5, torch.ones(3), gen()))
            True
        """
        return self._draw(self._sample, n, c, generator)

    @torch.no_grad()
    def sample_and_log_prob(
        self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draws as :meth:`sample` and the exact log-density of each under the distribution that
        drew it (for importance weights).

        Args:
            n: draws per condition.
            c: conditions ``[*cbatch, C]``, or ``None``.
            generator: random number generator, for reproducible draws.

        Returns:
            ``(x, log_q)``, ``[n, *cbatch, *event]`` and ``[n, *cbatch]``.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.RealNVP(2)
            >>> x, log_q = flow.sample_and_log_prob(6)
            >>> x.shape, log_q.shape, torch.allclose(log_q, flow.log_prob(x), atol=1e-5)
            (torch.Size([6, 2]), torch.Size([6]), True)
        """
        return self._draw(self._sample_and_log_prob, n, c, generator)

    def loss(self, x: Tensor, c: Tensor | None = None) -> Loss:
        """The training objective of a batch (a mean over all rows).

        Args:
            x: data ``[*batch, *event]``.
            c: conditions ``[C]`` or broadcastable to ``[*batch, C]``, or ``None``.

        Returns:
            :class:`Loss`: ``value`` to minimise and detached ``parts`` to log.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.RealNVP(2)
            >>> loss = flow.loss(torch.randn(32, 2))
            >>> loss.value.backward()
            >>> all(p.grad is not None for p in flow.parameters())
            True
        """
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


class ModelWrapper(nn.Module):
    r"""Base of a model that wraps an inner density model ``model`` of transformed data (for
    example :class:`~freeflows.standardized.StandardizedModel`): it forwards the inner model's
    ``condition_dim``, ``latent`` and ``divergence_hint``, and offers an optional method
    (``rsample``, ``inverse_defect``) exactly when the inner model has it and the wrapper
    implements it as ``_rsample`` / ``_inverse_defect``.

    Args:
        model: the inner density model.

    Example:
        >>> import freeflows as ff
        >>> from freeflows.contract import ModelWrapper
        >>> wrapped = ModelWrapper(ff.RealNVP(2, condition_dim=3))
        >>> wrapped.condition_dim, hasattr(wrapped, "rsample")  # no _rsample here
        (3, False)
    """

    #: optional methods, offered when the inner model has them and the wrapper has ``_<name>``
    OPTIONAL: ClassVar[tuple[str, ...]] = ("rsample", "inverse_defect")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def condition_dim(self) -> int | None:
        """The inner model's number of condition features, or ``None``."""
        return getattr(self.model, "condition_dim", None)

    @property
    def latent(self) -> nn.Module:
        """The inner model's latent (its ``dim`` is the dimension of the density's space)."""
        return self.model.latent

    @property
    def divergence_hint(self) -> str | None:
        """The inner model's hint on training divergence, if it has one."""
        return getattr(self.model, "divergence_hint", None)

    def __getattr__(self, name: str) -> Any:
        inner = self._modules.get("model")
        if name in self.OPTIONAL and hasattr(inner, name) and hasattr(type(self), f"_{name}"):
            return getattr(self, f"_{name}")
        return super().__getattr__(name)
