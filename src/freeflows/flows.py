r"""Exact normalizing flows: a :class:`~freeflows.transforms.base.Transform` and a latent.

.. math:: \log p(x \mid c) = \log p_Z(z) + \log\lvert\det \partial z/\partial x\rvert,
   \qquad z = T(x, c),

with :math:`T` the transform's ``forward`` (data → latent); samples are :math:`T^{-1}(z, c)`,
:math:`z \sim p_Z`. :class:`Flow` follows the model contract of :mod:`freeflows.contract`, and
the named flows below build it with sensible defaults:

* :class:`PlanarFlow`: planar maps; density by a numerical inverse (1-D solves), sampling in
  closed form;
* :class:`NICE`: additive couplings and a diagonal scaling; one pass each way;
* :class:`RealNVP`: affine couplings; one pass each way;
* :class:`Glow`: ActNorm, LU-decomposed linear maps, affine couplings (multi-scale on images);
  one pass each way;
* :class:`MAF`: masked autoregressive layers; density one pass, sampling ``D`` passes;
* :class:`IAF`: inverse autoregressive layers; sampling one pass, density ``D`` passes.

All of them are trained by maximum likelihood on data (:meth:`Flow.loss` is the mean negative
log-likelihood), and their ``log_prob`` is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .checks import check_condition_dim
from .contract import DensityModule, Loss
from .distributions import StandardNormal
from .serialization import named_constructor
from .transforms.autoregressive import InverseAutoregressive, MaskedAutoregressive
from .transforms.base import ComposedTransform, Transform
from .transforms.coupling import AdditiveCoupling, AffineCoupling, DiagonalScaling, half_mask
from .transforms.glow import ActNorm, InvertibleLinear, MultiScale
from .transforms.planar import Planar


def _event_shape(event_shape: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
    if not shape or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"event_shape must be a positive int or a tuple of them, got {event_shape!r}")
    return shape


def _features(name: str, event_shape: int | tuple[int, ...], minimum: int = 1) -> int:
    shape = _event_shape(event_shape)
    if len(shape) != 1:
        raise ValueError(f"{name} works on vectors: give features (an int), got event shape {shape}")
    if shape[0] < minimum:
        raise ValueError(f"{name} needs at least {minimum} features, got {shape[0]}")
    return shape[0]


def _positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Flow(DensityModule):
    r"""A normalizing flow ``x = transform.inverse(z, c)``, ``z ~ latent``, with the public
    methods of :class:`~freeflows.contract.DensityModule` (any batch shape; ``sample(n, c)`` with
    ``c`` of shape ``[B, C]`` gives ``[n, B, *event]``). ``loss`` is maximum likelihood: its
    ``value`` is the mean negative log-likelihood of the batch, and ``parts["nll"]`` its detached
    copy. ``sample_and_log_prob`` maps the draws back through ``forward`` (one pass each way).

    Args:
        transform: the bijection, ``forward`` data → latent.
        latent: a latent distribution (``event_shape``, ``log_prob``, ``sample``), e.g.
            :class:`~freeflows.distributions.StandardNormal`.
        condition_dim: features of the condition ``c``, or ``None`` for an unconditional flow.
    """

    def __init__(self, transform: Transform, latent: nn.Module, condition_dim: int | None = None):
        super().__init__()
        check_condition_dim(condition_dim)
        self.transform = transform
        self.latent = latent
        self.condition_dim = condition_dim
        self.event_shape: tuple[int, ...] = tuple(latent.event_shape)

    def _log_prob(self, x: Tensor, c: Tensor | None) -> Tensor:
        z, log_det = self.transform(x, c)
        return self.latent.log_prob(z) + log_det

    def _rsample(self, n: int, c: Tensor | None, generator: torch.Generator | None) -> Tensor:
        return self.transform.inverse(self.latent.sample(n, generator=generator), c)

    def _sample_and_log_prob(
        self, n: int, c: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        x = self._rsample(n, c, generator)
        return x, self._log_prob(x, c)

    def _loss(self, x: Tensor, c: Tensor | None) -> Loss:
        nll = -self._log_prob(x, c).mean()
        return Loss(nll, {"nll": nll.detach()})


class PlanarFlow(Flow):
    r"""``transforms`` planar maps (:class:`~freeflows.transforms.planar.Planar`) and a standard
    normal latent.

    Sampling uses the closed-form latent → data maps. The density, and hence :meth:`loss`
    (maximum likelihood on data), uses the **numerical inverse**: each layer solves a monotone
    scalar equation to tolerance ``tol``, and gradients are the exact implicit-function gradients
    (one Newton step with autograd at the root); see :mod:`freeflows.transforms.planar`.
    Training against an energy (reverse KL) would instead use :meth:`rsample`.
    """

    @named_constructor
    def __init__(
        self,
        features: int,
        condition_dim: int | None = None,
        *,
        transforms: int = 8,
        tol: float | None = None,
        max_iter: int = 100,
    ):
        d = _features("PlanarFlow", features)
        check_condition_dim(condition_dim)
        _positive(transforms=transforms, max_iter=max_iter)
        layers = [Planar(d, condition_dim, tol, max_iter) for _ in range(transforms)]
        super().__init__(ComposedTransform(*layers), StandardNormal(d), condition_dim)


class NICE(Flow):
    """NICE (Dinh et al., 2014): additive couplings with alternating halves, then a diagonal
    scaling; conditioners are MLPs of ``layers`` hidden layers of width ``hidden``."""

    @named_constructor
    def __init__(
        self,
        features: int,
        condition_dim: int | None = None,
        *,
        transforms: int = 4,
        hidden: int = 64,
        layers: int = 2,
    ):
        d = _features("NICE", features, minimum=2)
        check_condition_dim(condition_dim)
        _positive(transforms=transforms, hidden=hidden, layers=layers)
        steps: list[Transform] = [
            AdditiveCoupling(d, half_mask(d, flip=k % 2 == 1), hidden, layers, condition_dim)
            for k in range(transforms)
        ]
        steps.append(DiagonalScaling(d))
        super().__init__(ComposedTransform(*steps), StandardNormal(d), condition_dim)


class RealNVP(Flow):
    """RealNVP (Dinh et al., 2017) on vectors: affine couplings with alternating halves and a
    soft-clamped log-scale (bound ``clamp``)."""

    @named_constructor
    def __init__(
        self,
        features: int,
        condition_dim: int | None = None,
        *,
        transforms: int = 6,
        hidden: int = 64,
        layers: int = 2,
        clamp: float | None = 3.0,
    ):
        d = _features("RealNVP", features, minimum=2)
        check_condition_dim(condition_dim)
        _positive(transforms=transforms, hidden=hidden, layers=layers)
        steps = [
            AffineCoupling(d, half_mask(d, flip=k % 2 == 1), hidden, layers, condition_dim, clamp)
            for k in range(transforms)
        ]
        super().__init__(ComposedTransform(*steps), StandardNormal(d), condition_dim)


class Glow(Flow):
    r"""Glow (Kingma & Dhariwal, 2018) on vectors or images.

    * ``event_shape = D`` (or ``(D,)``): ``steps`` steps of ActNorm, LU-decomposed invertible
      linear map and affine coupling (MLP conditioner, ``hidden`` × ``layers``).
    * ``event_shape = (C, H, W)``: the multi-scale architecture,
      :class:`~freeflows.transforms.glow.MultiScale`, with ``levels`` levels of ``steps`` steps
      (ActNorm, invertible 1×1 convolution, affine coupling with a conv conditioner of
      ``hidden`` channels). ``H`` and ``W`` must be divisible by ``2**levels``.

    ``min_std`` floors the standard deviation used by ActNorm's data-dependent initialisation.
    """

    @named_constructor
    def __init__(
        self,
        event_shape: int | tuple[int, ...],
        condition_dim: int | None = None,
        *,
        steps: int = 4,
        levels: int = 2,
        hidden: int = 64,
        layers: int = 2,
        clamp: float | None = 3.0,
        min_std: float = 1e-3,
    ):
        shape = _event_shape(event_shape)
        check_condition_dim(condition_dim)
        _positive(steps=steps, levels=levels, hidden=hidden, layers=layers)
        if len(shape) == 1:
            d = _features("Glow", shape, minimum=2)
            transform: Transform = ComposedTransform(
                *(
                    ComposedTransform(
                        ActNorm(d, min_std),
                        InvertibleLinear(d),
                        AffineCoupling(
                            d, half_mask(d, flip=k % 2 == 1), hidden, layers, condition_dim, clamp
                        ),
                    )
                    for k in range(steps)
                )
            )
        elif len(shape) == 3:
            transform = MultiScale(shape, levels, steps, hidden, condition_dim, clamp, min_std)  # type: ignore[arg-type]
        else:
            raise ValueError(f"Glow works on vectors (D,) or images (C, H, W), got event shape {shape}")
        super().__init__(transform, StandardNormal(*shape), condition_dim)


class MAF(Flow):
    """Masked autoregressive flow (Papamakarios et al., 2017): ``transforms`` MADE-driven affine
    layers, alternating the natural and reversed order. Density: one pass per layer; sampling:
    ``D`` passes per layer."""

    _layer = MaskedAutoregressive

    @named_constructor
    def __init__(
        self,
        features: int,
        condition_dim: int | None = None,
        *,
        transforms: int = 4,
        hidden: int = 64,
        layers: int = 2,
        clamp: float | None = 3.0,
    ):
        d = _features(type(self).__name__, features)
        check_condition_dim(condition_dim)
        _positive(transforms=transforms, hidden=hidden, layers=layers)
        natural = torch.arange(d)
        steps = [
            self._layer(d, hidden, layers, condition_dim, natural if k % 2 == 0 else natural.flip(0), clamp)
            for k in range(transforms)
        ]
        super().__init__(ComposedTransform(*steps), StandardNormal(d), condition_dim)


class IAF(MAF):
    """Inverse autoregressive flow (Kingma et al., 2016): as :class:`MAF` with the directions
    swapped. Sampling: one pass per layer; density: ``D`` passes per layer (so maximum-likelihood
    training on data costs ``D`` times more than with MAF)."""

    _layer = InverseAutoregressive
