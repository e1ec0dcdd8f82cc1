r"""A density model of z-scored data, seen in the data's own units: :class:`StandardizedModel`.

A model that learns standardised data :math:`u = T(x) = (x - \mu)/\sigma`
(:class:`~freeflows.transforms.standardize.Standardizer`) is, by the change of variables through
the affine bijection :math:`T`, a model of :math:`x` whose density carries the constant
:math:`-\sum_j \log\sigma_j`. The wrapper is a model (it has the contract's methods), so it
lives with the models; the tool's data layer wraps a user's model in it when the user's file is
standardised.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .contract import Loss, ModelWrapper
from .transforms.standardize import Standardizer


class StandardizedModel(ModelWrapper):
    r"""A density model of z-scored data, seen in the data's own units.

    The inner model :math:`\tilde q` learns :math:`u = T(x) = (x - \mu_x)/\sigma_x` given
    :math:`\tilde c = T_c(c)`. By the change of variables through the affine bijection :math:`T`,

    .. math:: \log q(x \mid c) = \log \tilde q\big(T(x) \mid T_c(c)\big) - \textstyle\sum_j \log\sigma_{x,j},
       \qquad x = T^{-1}(u),\ u \sim \tilde q(\cdot \mid T_c(c)),

    so ``log_prob`` and ``sample`` follow the model contract in the original units, and the
    density still integrates to one. ``loss`` is the inner model's loss on standardised data
    (the quantity being minimised); its ``nll`` part, a negative log-density, is shifted by
    :math:`+\sum_j \log\sigma_{x,j}` into original units. ``diagnostics`` (for example a
    reconstruction error) are the inner model's, in standardised units, with the same shift for
    the ``log_prob`` passed in. The statistics are buffers, so they are saved with the weights.

    Args:
        model: any density model of the contract (inner model, on standardised data).
        standardizer: :math:`T` of the data.
        condition_standardizer: :math:`T_c` of the conditions, or ``None`` to pass them as they are.

    Example:
        >>> import torch, freeflows as ff
        >>> from freeflows.standardized import StandardizedModel
        >>> from freeflows.transforms import Standardizer
        >>> unit = Standardizer(torch.zeros(2), torch.full((2,), 2.0))
        >>> model = StandardizedModel(ff.CNF(2, hidden=8), unit)  # N(0, I) at first: N(0, 4 I) on x
        >>> x = torch.tensor([[2.0, 0.0]])
        >>> torch.allclose(model.log_prob(x), torch.distributions.Normal(0.0, 2.0).log_prob(x).sum(-1))
        True
    """

    def __init__(
        self, model: nn.Module, standardizer: Standardizer, condition_standardizer: Standardizer | None = None
    ) -> None:
        super().__init__(model)
        self.standardizer = standardizer
        self.condition_standardizer = condition_standardizer

    def _c(self, c: Tensor | None) -> Tensor | None:
        if c is None or self.condition_standardizer is None:
            return c
        return self.condition_standardizer(c)[0]

    def _shift(self) -> Tensor:
        return self.standardizer.log_abs_det()

    def log_prob(self, x: Tensor, c: Tensor | None = None, **kwargs: Any) -> Tensor:
        r""":math:`\log\tilde q(T(x) \mid T_c(c)) - \sum_j \log\sigma_j`; keywords go to the inner model."""
        log_q = self.model.log_prob(self.standardizer(x)[0], self._c(c), **kwargs)
        return log_q + self._shift().to(log_q)

    def sample(self, n: int, c: Tensor | None = None, **kwargs: Any) -> Tensor:
        """``n`` draws in original units, :math:`T^{-1}(u)`; keywords go to the inner model."""
        return self.standardizer.inverse(self.model.sample(n, self._c(c), **kwargs))

    def _rsample(self, n: int, c: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Reparametrised draws in original units (``rsample``, when the inner model has one)."""
        return self.standardizer.inverse(self.model.rsample(n, self._c(c), **kwargs))

    def sample_and_log_prob(self, n: int, c: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Draws and their log-density, both in original units."""
        u, log_q = self.model.sample_and_log_prob(n, self._c(c), **kwargs)
        return self.standardizer.inverse(u), log_q + self._shift().to(log_q)

    def loss(self, x: Tensor, c: Tensor | None = None) -> Loss:
        """The inner model's loss on :math:`(T(x), T_c(c))`, with ``parts["nll"]`` in original units."""
        loss = self.model.loss(self.standardizer(x)[0], self._c(c))
        if "nll" in loss.parts:
            loss.parts = {**loss.parts, "nll": loss.parts["nll"] - self._shift().to(loss.parts["nll"])}
        return loss

    def diagnostics(
        self, x: Tensor, c: Tensor | None = None, log_prob: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The inner model's ``diagnostics`` on standardised data (``{}`` if it has none)."""
        if not hasattr(self.model, "diagnostics"):
            return {}
        if log_prob is not None:
            log_prob = log_prob - self._shift().to(log_prob)
        return self.model.diagnostics(self.standardizer(x)[0], self._c(c), log_prob=log_prob)
