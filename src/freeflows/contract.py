r"""The one model contract that every density model in freeflows follows.

Every model is a :class:`torch.nn.Module` with these methods:

* ``log_prob(x, c=None) -> Tensor[B]``: the log-density (nats) of each row of ``x`` under the
  distribution that ``sample`` draws from; it integrates to one. A value that is not normalised
  (the free-form papers' formula) is only ever returned under its own name
  (``FreeFormFlow.log_prob(x, variant="paper")``);
* ``sample(n, c=None) -> Tensor[n, *event]``: draws from the model, never with a graph;
  ``rsample`` gives reparametrised draws with gradients;
* ``sample_and_log_prob(n, c=None) -> (Tensor[n, *event], Tensor[n])``: draws and the exact
  log-density of each under the distribution that drew it (for importance weights);
* ``loss(x, c=None) -> Loss``: the training objective of a batch.

Direction convention, stated once for the whole library: **forward maps data to latent**
(:math:`z = f(x)`), and **inverse maps latent to data** (:math:`x = f^{-1}(z)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor


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
    """Structural type of every freeflows model."""

    def log_prob(self, x: Tensor, c: Tensor | None = None) -> Tensor: ...

    def sample(self, n: int, c: Tensor | None = None) -> Tensor: ...

    def sample_and_log_prob(self, n: int, c: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    def loss(self, x: Tensor, c: Tensor | None = None) -> Loss: ...
