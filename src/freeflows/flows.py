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
    ``c`` of shape ``[B, C]`` gives ``[n, B, *event]``):

    .. math:: \log p(x \mid c) = \log p_Z(T(x, c)) + \log\lvert\det J_T(x, c)\rvert .

    ``loss`` is maximum likelihood: its ``value`` is the mean negative log-likelihood of the
    batch, and ``parts["nll"]`` its detached copy. ``sample_and_log_prob`` maps the draws back
    through ``forward`` (one pass each way).

    Args:
        transform: the bijection :math:`T`, ``forward`` data → latent.
        latent: a latent distribution (``event_shape``, ``log_prob``, ``sample``), e.g.
            :class:`~freeflows.distributions.StandardNormal`.
        condition_dim: features of the condition ``c``, or ``None`` for an unconditional flow.

    References:
        Rezende and Mohamed, "Variational Inference with Normalizing Flows" (2015),
        arXiv:1505.05770.

    Example:
        >>> import torch, freeflows as ff
        >>> from freeflows.transforms import AffineCoupling, ComposedTransform, Reverse
        >>> transform = ComposedTransform(AffineCoupling(2, condition_dim=1), Reverse(2))
        >>> flow = ff.Flow(transform, ff.StandardNormal(2), condition_dim=1)
        >>> x, c = torch.randn(10, 2), torch.randn(10, 1)
        >>> flow.log_prob(x, c).shape, flow.sample(3, c).shape
        (torch.Size([10]), torch.Size([3, 10, 2]))
        >>> flow.loss(x, c).value.backward()  # maximum likelihood
    """

    def __init__(self, transform: Transform, latent: nn.Module, condition_dim: int | None = None) -> None:
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
    normal latent; each map goes from latent to data as

    .. math:: x = z + \hat u \tanh(w^\top z + b), \qquad w^\top \hat u > -1 .

    Sampling uses the closed-form latent → data maps. The density, and hence :meth:`loss`
    (maximum likelihood on data), uses the **numerical inverse**: each layer solves a monotone
    scalar equation to tolerance ``tol``, and gradients are the exact implicit-function gradients
    (one Newton step with autograd at the root); see :mod:`freeflows.transforms.planar`.
    Training against an energy (reverse KL) would instead use :meth:`rsample`.

    Args:
        features: ``D``, the size of the data vectors.
        condition_dim: features of the condition ``c``, or ``None``.
        transforms: number of planar maps.
        tol: tolerance of each layer's scalar solve; ``None`` for :math:`\epsilon^{3/4}` of the
            dtype.
        max_iter: cap on each solve's steps.

    References:
        Rezende and Mohamed, "Variational Inference with Normalizing Flows" (2015),
        arXiv:1505.05770.

    Example:
        >>> import torch, freeflows as ff
        >>> flow = ff.PlanarFlow(2, transforms=4)
        >>> x = flow.sample(5)
        >>> x.shape, flow.log_prob(x).shape
        (torch.Size([5, 2]), torch.Size([5]))
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
    ) -> None:
        d = _features("PlanarFlow", features)
        check_condition_dim(condition_dim)
        _positive(transforms=transforms, max_iter=max_iter)
        layers = [Planar(d, condition_dim, tol, max_iter) for _ in range(transforms)]
        super().__init__(ComposedTransform(*layers), StandardNormal(d), condition_dim)


class NICE(Flow):
    r"""NICE: ``transforms`` additive couplings with alternating halves, then a diagonal scaling,
    and a standard normal latent:

    .. math:: z_b = x_b + t_k(x_a, c) \quad \text{(each coupling)}, \qquad
       z = x \odot e^{s}, \quad \log\lvert\det J\rvert = \textstyle\sum_i s_i
       \quad \text{(the scaling)} .

    Args:
        features: ``D >= 2``.
        condition_dim: features of the condition ``c``, or ``None``.
        transforms: number of couplings.
        hidden: width of the conditioners' hidden layers.
        layers: number of the conditioners' hidden layers.

    References:
        Dinh, Krueger and Bengio, "NICE: Non-linear Independent Components Estimation" (2014),
        arXiv:1410.8516.

    Example:
        >>> import torch, freeflows as ff
        >>> flow = ff.NICE(4, transforms=2, hidden=16)
        >>> x = torch.randn(8, 4)
        >>> flow.log_prob(x).shape, flow.sample(3).shape
        (torch.Size([8]), torch.Size([3, 4]))
    """

    @named_constructor
    def __init__(
        self,
        features: int,
        condition_dim: int | None = None,
        *,
        transforms: int = 4,
        hidden: int = 64,
        layers: int = 2,
    ) -> None:
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
    r"""RealNVP on vectors: ``transforms`` affine couplings with alternating halves and a
    standard normal latent,

    .. math:: z_b = x_b \odot e^{s(x_a, c)} + t(x_a, c), \qquad
       \log\lvert\det J\rvert = \textstyle\sum_j s_j(x_a, c),

    with the log-scale soft-clamped, :math:`s = \kappa\tanh(\tilde s/\kappa)`.

    Args:
        features: ``D >= 2``.
        condition_dim: features of the condition ``c``, or ``None``.
        transforms: number of couplings.
        hidden: width of the conditioners' hidden layers.
        layers: number of the conditioners' hidden layers.
        clamp: :math:`\kappa > 0`, the bound of the log-scales; ``None`` for no clamp.

    References:
        Dinh, Sohl-Dickstein and Bengio, "Density estimation using Real NVP" (2016),
        arXiv:1605.08803.

    Example:
        >>> import torch, freeflows as ff
        >>> flow = ff.RealNVP(3, condition_dim=2, transforms=4, hidden=32)
        >>> x, c = torch.randn(16, 3), torch.randn(16, 2)
        >>> flow.log_prob(x, c).shape, flow.sample(5, c[:2]).shape
        (torch.Size([16]), torch.Size([5, 2, 3]))
    """

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
    ) -> None:
        d = _features("RealNVP", features, minimum=2)
        check_condition_dim(condition_dim)
        _positive(transforms=transforms, hidden=hidden, layers=layers)
        steps = [
            AffineCoupling(d, half_mask(d, flip=k % 2 == 1), hidden, layers, condition_dim, clamp)
            for k in range(transforms)
        ]
        super().__init__(ComposedTransform(*steps), StandardNormal(d), condition_dim)


class Glow(Flow):
    r"""Glow on vectors or images, with a standard normal latent. Each step is

    .. math:: x \mapsto \mathrm{Coupling}\bigl(W \cdot \mathrm{ActNorm}(x)\bigr), \qquad
       \log\lvert\det J\rvert = \log\lvert\det J_{\mathrm{ActNorm}}\rvert + \log\lvert\det W\rvert
       + \textstyle\sum_j s_j ,

    with :math:`W` in LU form (:math:`\log\lvert\det W\rvert = \sum_i \ell_i`).

    * ``event_shape = D`` (or ``(D,)``): ``steps`` steps of ActNorm, LU-decomposed invertible
      linear map and affine coupling (MLP conditioner, ``hidden`` × ``layers``).
    * ``event_shape = (C, H, W)``: the multi-scale architecture,
      :class:`~freeflows.transforms.glow.MultiScale`, with ``levels`` levels of ``steps`` steps
      (ActNorm, invertible 1×1 convolution, affine coupling with a conv conditioner of
      ``hidden`` channels). ``H`` and ``W`` must be divisible by ``2**levels``.

    Args:
        event_shape: ``D`` or ``(D,)`` for vectors, ``(C, H, W)`` for images.
        condition_dim: features of the condition ``c``, or ``None``.
        steps: Glow steps (per level, on images).
        levels: levels of the multi-scale architecture (images only).
        hidden: width (or channels) of the couplings' conditioners.
        layers: hidden layers of the MLP conditioners (vectors only).
        clamp: bound of the couplings' log-scales, or ``None``.
        min_std: floor of the standard deviation used by ActNorm's data-dependent
            initialisation.

    References:
        Kingma and Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
        arXiv:1807.03039.

    Example:
        >>> import torch, freeflows as ff
        >>> flow = ff.Glow(3, steps=2, hidden=16)
        >>> flow.log_prob(torch.randn(8, 3)).shape  # the first batch initialises ActNorm
        torch.Size([8])
        >>> images = ff.Glow((1, 4, 4), steps=1, levels=2, hidden=8)
        >>> images.log_prob(torch.randn(2, 1, 4, 4)).shape, images.sample(3).shape
        (torch.Size([2]), torch.Size([3, 1, 4, 4]))
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
    ) -> None:
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
    r"""Masked autoregressive flow: ``transforms`` MADE-driven affine layers, alternating the
    natural and reversed order, and a standard normal latent. Each layer is

    .. math:: z_i = x_i\, e^{s_i(x_{<i}, c)} + t_i(x_{<i}, c), \qquad
       \log\lvert\det J\rvert = \textstyle\sum_i s_i(x_{<i}, c) .

    Density: one pass per layer; sampling: ``D`` passes per layer.

    Args:
        features: ``D``.
        condition_dim: features of the condition ``c``, or ``None``.
        transforms: number of autoregressive layers.
        hidden: width of the MADEs' hidden layers.
        layers: number of the MADEs' hidden layers.
        clamp: bound of the log-scales, or ``None``.

    References:
        Papamakarios, Pavlakou and Murray, "Masked Autoregressive Flow for Density Estimation"
        (2017), arXiv:1705.07057.
        Germain, Gregor, Murray and Larochelle, "MADE: Masked Autoencoder for Distribution
        Estimation" (2015), arXiv:1502.03509.

    Example:
        >>> import torch, freeflows as ff
        >>> flow = ff.MAF(3, transforms=2, hidden=16)
        >>> x, log_q = flow.sample_and_log_prob(4)
        >>> x.shape, torch.allclose(log_q, flow.log_prob(x), atol=1e-5)
        (torch.Size([4, 3]), True)
    """

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
    ) -> None:
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
    r"""Inverse autoregressive flow: as :class:`MAF` with the directions swapped. Each layer is

    .. math:: x_i = z_i\, e^{s_i(z_{<i}, c)} + t_i(z_{<i}, c), \qquad
       \log\lvert\det \partial z/\partial x\rvert = -\textstyle\sum_i s_i(z_{<i}, c) .

    Sampling: one pass per layer; density: ``D`` passes per layer (so maximum-likelihood
    training on data costs ``D`` times more than with MAF).

    Args:
        features: ``D``.
        condition_dim: features of the condition ``c``, or ``None``.
        transforms: number of autoregressive layers.
        hidden: width of the MADEs' hidden layers.
        layers: number of the MADEs' hidden layers.
        clamp: bound of the log-scales, or ``None``.

    References:
        Kingma, Salimans, Jozefowicz, Chen, Sutskever and Welling, "Improving Variational
        Inference with Inverse Autoregressive Flow" (2016), arXiv:1606.04934.

    Example:
        >>> import torch, freeflows as ff
        >>> flow = ff.IAF(3, transforms=2, hidden=16)
        >>> x = flow.rsample(4)  # one pass per layer, with gradients
        >>> x.shape, flow.log_prob(x).shape
        (torch.Size([4, 3]), torch.Size([4]))
    """

    _layer = InverseAutoregressive
