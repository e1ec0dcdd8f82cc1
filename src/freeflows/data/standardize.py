r"""Feature-wise z-scoring as an exact affine bijection.

.. math:: T(v) = (v - \mu) \oslash \sigma, \qquad T^{-1}(u) = u \odot \sigma + \mu, \qquad
   \log\lvert\det J_T\rvert = -\textstyle\sum_j \log \sigma_j ,

with :math:`\mu, \sigma` the mean and standard deviation of a fitting set. A feature whose
standard deviation is below ``min_std`` (a constant feature) gets :math:`\sigma_j = 1`, so it is
only centred instead of blown up.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..contract import Loss


class Standardizer(nn.Module):
    r"""The z-score :math:`T(v) = (v - \mu)/\sigma` of vectors ``[N, D]``, invertible and exact.

    Args:
        mean: :math:`\mu`, shape ``[D]``.
        std: :math:`\sigma`, shape ``[D]``, all positive.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        if mean.dim() != 1 or mean.shape != std.shape:
            raise ValueError(
                f"mean and std must both have shape [D], got {tuple(mean.shape)} and {tuple(std.shape)}"
            )
        if not bool((std > 0).all()):
            raise ValueError("std must be positive")
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    @classmethod
    def fit(cls, v: Tensor, min_std: float = 1e-6) -> Standardizer:
        """Mean and (unbiased) standard deviation of the rows of ``v [N, D]``; ``std < min_std`` -> 1."""
        if v.dim() != 2 or v.shape[0] < 2:
            raise ValueError(f"fit needs data of shape [N >= 2, D], got {tuple(v.shape)}")
        std = v.std(dim=0)
        std = torch.where(std < min_std, torch.ones_like(std), std)
        return cls(v.mean(dim=0), std)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def forward(self, v: Tensor) -> Tensor:
        r""":math:`T(v) = (v - \mu)/\sigma`."""
        return (v - self.mean.to(v)) / self.std.to(v)

    def inverse(self, u: Tensor) -> Tensor:
        r""":math:`T^{-1}(u) = u\,\sigma + \mu`."""
        return u * self.std.to(u) + self.mean.to(u)

    def log_abs_det(self) -> Tensor:
        r""":math:`\log\lvert\det J_T\rvert = -\sum_j \log\sigma_j`, a scalar (the same for every ``v``)."""
        return -self.std.log().sum()

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class StandardizedModel(nn.Module):
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
    """

    def __init__(
        self, model: nn.Module, standardizer: Standardizer, condition_standardizer: Standardizer | None = None
    ):
        super().__init__()
        self.model = model
        self.standardizer = standardizer
        self.condition_standardizer = condition_standardizer

    def _c(self, c: Tensor | None) -> Tensor | None:
        if c is None or self.condition_standardizer is None:
            return c
        return self.condition_standardizer(c)

    def _shift(self) -> Tensor:
        return self.standardizer.log_abs_det()

    @property
    def condition_dim(self) -> int | None:
        return getattr(self.model, "condition_dim", None)

    @property
    def latent(self) -> nn.Module:
        """The inner model's latent (its ``dim`` is the dimension of the density's space)."""
        return self.model.latent

    @property
    def divergence_hint(self) -> str | None:
        return getattr(self.model, "divergence_hint", None)

    def log_prob(self, x: Tensor, c: Tensor | None = None, **kwargs) -> Tensor:
        r""":math:`\log\tilde q(T(x) \mid T_c(c)) - \sum_j \log\sigma_j`; keywords go to the inner model."""
        log_q = self.model.log_prob(self.standardizer(x), self._c(c), **kwargs)
        return log_q + self._shift().to(log_q)

    def sample(self, n: int, c: Tensor | None = None, **kwargs) -> Tensor:
        """``n`` draws in original units, :math:`T^{-1}(u)`; keywords go to the inner model."""
        return self.standardizer.inverse(self.model.sample(n, self._c(c), **kwargs))

    def __getattr__(self, name: str):
        # ``rsample`` exists exactly when the inner model has one
        if name == "rsample" and hasattr(self._modules["model"], "rsample"):
            return self._rsample
        return super().__getattr__(name)

    def _rsample(self, n: int, c: Tensor | None = None, **kwargs) -> Tensor:
        """Reparametrised draws in original units (``rsample``, when the inner model has one)."""
        return self.standardizer.inverse(self.model.rsample(n, self._c(c), **kwargs))

    def sample_and_log_prob(self, n: int, c: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor]:
        """Draws and their log-density, both in original units."""
        u, log_q = self.model.sample_and_log_prob(n, self._c(c), **kwargs)
        return self.standardizer.inverse(u), log_q + self._shift().to(log_q)

    def loss(self, x: Tensor, c: Tensor | None = None) -> Loss:
        """The inner model's loss on :math:`(T(x), T_c(c))`, with ``parts["nll"]`` in original units."""
        loss = self.model.loss(self.standardizer(x), self._c(c))
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
        return self.model.diagnostics(self.standardizer(x), self._c(c), log_prob=log_prob)
