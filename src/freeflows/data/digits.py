r"""scikit-learn's 8×8 handwritten digits as images, uniformly dequantised (never downloaded).

**Data.** The 1797 images of ``sklearn.datasets.load_digits`` (bundled with scikit-learn), each
``[1, 8, 8]`` with integer values :math:`v \in \{0, \dots, 16\}` (:data:`LEVELS` = 17 levels).
One fixed split, shuffled by ``split_seed`` (0 by default, independent of the run's seed so that
every run is scored on the same images): 1257 training, 180 validation and 360 test images.

**Dequantisation.** A model sees :math:`x = (v + u)/17 \in [0, 1)^{64}`,
:math:`u \sim \mathcal U[0, 1)^{64}`. The splits hold one fixed draw of :math:`u` per image
(seeded by ``split_seed``), so validation and test scores are deterministic; during training
(:class:`DequantizedImageModel` in training mode) every batch draws :math:`u` afresh, within
each image's integer bins. The test negative log-likelihood of one draw per image is an unbiased
estimate of :math:`\mathbb E_u[-\log q(x)]`, which bounds the discrete model's
:math:`-\log P(v)` from above (Theis, van den Oord and Bethge, arXiv:1511.01844).

**Bits per dimension** (:func:`freeflows.eval.bits.bits_per_dim`). With :math:`q` the density
of :math:`x` on the :math:`[0, 1]` scale, the density of :math:`v + u` on the :math:`[0, 17]` scale is
:math:`q(x)/17^D`, so with :math:`D = 64`

.. math:: \mathrm{bits/dim} = \frac{-\log q(x) + D \log 17}{D \ln 2} .

**Pre-transform** (:class:`ImagePreprocess`). Before the model, :math:`x` goes through an exact
bijection :math:`T` whose log-determinant is added to the density, so that ``log_prob`` is the
density of :math:`x` itself:

* ``"logit"`` (default): :math:`\ell(x) = \operatorname{logit}(\alpha + (1 - 2\alpha) x)`,
  :math:`\alpha = 0.05` (Dinh, Sohl-Dickstein and Bengio, arXiv:1605.08803), then a per-pixel
  z-score fitted on the training split;
* ``"affine"``: the per-pixel z-score alone.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..contract import Loss, ModelWrapper
from .base import DataSet, Split

#: Grey levels of the digits (values 0..16).
LEVELS = 17
#: Images in the train, validation and test splits.
N_TRAIN, N_VAL, N_TEST = 1257, 180, 360
#: Shape of one image.
EVENT_SHAPE = (1, 8, 8)
#: The logit pre-transform's margin.
ALPHA = 0.05

#: The options of :func:`load_digits` that ``data.options`` may set.
OPTIONS: tuple[str, ...] = ("split_seed", "preprocess", "alpha")

Preprocess = Literal["logit", "affine"]
PREPROCESS: tuple[str, ...] = ("logit", "affine")


def digit_values() -> Tensor:
    """All 1797 digits as float32 ``[1797, 1, 8, 8]`` with integer values 0..16, in
    scikit-learn's order."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    return torch.as_tensor(images, dtype=torch.float32).unsqueeze(1)


def dequantize(v: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""Uniform dequantisation :math:`x = (v + u)/17`, :math:`u \sim \mathcal U[0, 1)` per pixel.

    Args:
        v: integer grey levels 0..16 (any shape, floating dtype).
        generator: random number generator of :math:`u`.

    Returns:
        :math:`x \in [0, 1)`, shaped like ``v``.

    Example:
        >>> import torch
        >>> from freeflows.data.digits import dequantize
        >>> x = dequantize(torch.tensor([0.0, 16.0]), torch.Generator().manual_seed(0))
        >>> bool(0 <= x[0] < 1 / 17), bool(16 / 17 <= x[1] < 1)
        (True, True)
    """
    u = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device)
    return (v + u) / LEVELS


def requantize(x: Tensor) -> Tensor:
    """The grey levels ``v`` of dequantised values ``x`` (the inverse of :func:`dequantize` up to
    the noise): :math:`\\lfloor 17 x \\rfloor`, clipped to 0..16."""
    return torch.floor(x * LEVELS).clamp(0, LEVELS - 1)


class ImagePreprocess(nn.Module):
    r"""The exact bijection :math:`T(x) = (\ell(x) - \mu) \oslash \sigma` of the module docstring,
    per pixel, with its log-determinant

    .. math:: \log\lvert\det J_T(x)\rvert = \sum_j \log \ell'(x_j) - \log \sigma_j, \qquad
       \ell'(x) = \frac{1 - 2\alpha}{s(1 - s)},\ s = \alpha + (1 - 2\alpha) x

    (:math:`\ell' = 1` for ``"affine"``). With ``"logit"`` the support of :math:`x` is the box
    :math:`(-\alpha, 1 - \alpha)/(1 - 2\alpha)`; outside it the log-determinant is :math:`-\infty`.

    Args:
        mean: :math:`\mu`, ``[*event]``.
        std: :math:`\sigma`, ``[*event]``, positive.
        kind: ``"logit"`` or ``"affine"``.
        alpha: :math:`\alpha \in (0, 1/2)`.

    Example:
        >>> import torch
        >>> from freeflows.data.digits import ImagePreprocess
        >>> x = torch.rand(50, 1, 8, 8)
        >>> t = ImagePreprocess.fit(x, "logit")
        >>> y, log_det = t(x)
        >>> torch.allclose(t.inverse(y), x, atol=1e-5), log_det.shape
        (True, torch.Size([50]))
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor, kind: Preprocess = "logit", alpha: float = ALPHA) -> None:
        super().__init__()
        if kind not in PREPROCESS:
            raise ValueError(f"unknown preprocess {kind!r}; choose one of {', '.join(PREPROCESS)}")
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 1/2), got {alpha!r}")
        if mean.shape != std.shape or not bool((std > 0).all()):
            raise ValueError("mean and std must have the same shape and std must be positive")
        self.kind: Preprocess = kind
        self.alpha = float(alpha)
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    @classmethod
    def fit(cls, x: Tensor, kind: Preprocess = "logit", alpha: float = ALPHA) -> ImagePreprocess:
        """Per-pixel mean and standard deviation of :math:`\\ell(x)` over the rows of ``x``
        (``[N, *event]``, values in [0, 1])."""
        identity = cls(torch.zeros(x.shape[1:]), torch.ones(x.shape[1:]), kind, alpha)
        h = identity._squash(x)
        return cls(h.mean(0), h.std(0).clamp_min(1e-6), kind, alpha)

    def _squash(self, x: Tensor) -> Tensor:
        if self.kind == "affine":
            return x
        s = self.alpha + (1 - 2 * self.alpha) * x
        return torch.log(s) - torch.log1p(-s)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(T(x), log|det J_T(x)|)``, shaped like ``x`` and ``[B]``; rows outside the support
        get ``T = 0`` and log-determinant :math:`-\\infty`."""
        log_det = -self.std.log().sum().to(x).expand(x.shape[0])
        if self.kind == "logit":
            s = self.alpha + (1 - 2 * self.alpha) * x
            inside = ((s > 0) & (s < 1)).reshape(x.shape[0], -1).all(dim=1)
            s = torch.where(inside.reshape(-1, *([1] * (x.dim() - 1))), s, torch.full_like(s, 0.5))
            h = torch.log(s) - torch.log1p(-s)
            dlog = math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)
            log_det = log_det + dlog.reshape(x.shape[0], -1).sum(dim=1)
            log_det = torch.where(inside, log_det, torch.full_like(log_det, -math.inf))
        else:
            h = x
        return (h - self.mean.to(x)) / self.std.to(x), log_det

    def inverse(self, y: Tensor) -> Tensor:
        """:math:`T^{-1}(y)`."""
        h = y * self.std.to(y) + self.mean.to(y)
        if self.kind == "affine":
            return h
        return (torch.sigmoid(h) - self.alpha) / (1 - 2 * self.alpha)


class DequantizedImageModel(ModelWrapper):
    r"""A density model of dequantised images :math:`x \in [0, 1)^D`, learning :math:`y = T(x)`.

    .. math:: \log q(x) = \log\tilde q(T(x)) + \log\lvert\det J_T(x)\rvert, \qquad
       x = T^{-1}(y),\ y \sim \tilde q,

    so ``log_prob`` is a normalised density of :math:`x` (the inner model's ``variant`` keywords
    pass through; the free-form paper's value stays unnormalised). In training mode ``loss``
    first draws fresh dequantisation noise: :math:`x \leftarrow (\lfloor 17x\rfloor + u)/17`.
    ``diagnostics`` and ``inverse_defect`` are the inner model's, on :math:`T(x)`. A loss part
    named ``nll`` is shifted into the units of :math:`x`.

    Args:
        model: any density model of the contract on events shaped like the images.
        preprocess: :math:`T`.
        levels: grey levels (for the fresh dequantisation).
    """

    def __init__(self, model: nn.Module, preprocess: ImagePreprocess, levels: int = LEVELS) -> None:
        super().__init__(model)
        self.preprocess = preprocess
        self.levels = levels

    def log_prob(self, x: Tensor, c: Tensor | None = None, **kwargs: Any) -> Tensor:
        r""":math:`\log\tilde q(T(x)) + \log\lvert\det J_T(x)\rvert`; :math:`-\infty` outside
        the support of :math:`T`. Keywords go to the inner model."""
        y, log_det = self.preprocess(x)
        log_q = self.model.log_prob(y, c, **kwargs)
        out = log_q + log_det.to(log_q)
        return torch.where(torch.isneginf(log_det), log_det.to(log_q), out)

    def sample(self, n: int, c: Tensor | None = None, **kwargs: Any) -> Tensor:
        """``n`` draws :math:`T^{-1}(y)`; keywords go to the inner model."""
        return self.preprocess.inverse(self.model.sample(n, c, **kwargs))

    def _rsample(self, n: int, c: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self.preprocess.inverse(self.model.rsample(n, c, **kwargs))

    def sample_and_log_prob(self, n: int, c: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Draws and their log-density, in the units of :math:`x`."""
        y, log_q = self.model.sample_and_log_prob(n, c, **kwargs)
        x = self.preprocess.inverse(y)
        flat = x.reshape(-1, *x.shape[-len(self.preprocess.mean.shape) :])
        _, log_det = self.preprocess(flat)
        return x, log_q + log_det.reshape(log_q.shape).to(log_q)

    def redraw(self, x: Tensor) -> Tensor:
        """Fresh dequantisation noise within the grey level of every pixel of ``x``."""
        v = torch.floor(x * self.levels).clamp(0, self.levels - 1)
        return (v + torch.rand_like(v)) / self.levels

    def loss(self, x: Tensor, c: Tensor | None = None) -> Loss:
        """The inner model's loss on :math:`T(x)` (with fresh dequantisation in training mode)."""
        if self.training:
            x = self.redraw(x)
        y, log_det = self.preprocess(x)
        loss = self.model.loss(y, c)
        if "nll" in loss.parts:
            nll = loss.parts["nll"]
            loss.parts = {**loss.parts, "nll": nll - log_det.mean().to(nll)}
        return loss

    def diagnostics(
        self, x: Tensor, c: Tensor | None = None, log_prob: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The inner model's ``diagnostics`` on :math:`T(x)` (``{}`` if it has none)."""
        if not hasattr(self.model, "diagnostics"):
            return {}
        y, log_det = self.preprocess(x)
        if log_prob is not None:
            log_prob = log_prob - log_det.to(log_prob)
        return self.model.diagnostics(y, c, log_prob=log_prob)

    def _inverse_defect(self, x: Tensor, c: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self.model.inverse_defect(self.preprocess(x)[0], c, **kwargs)


def _split_indices(split_seed: int) -> tuple[Tensor, Tensor, Tensor]:
    perm = torch.randperm(N_TRAIN + N_VAL + N_TEST, generator=torch.Generator().manual_seed(split_seed))
    return perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_VAL], perm[N_TRAIN + N_VAL :]


def load_digits(
    n_train: int | None = None, *, split_seed: int = 0, preprocess: Preprocess = "logit", alpha: float = ALPHA
) -> DataSet:
    r"""The digits as a :class:`~freeflows.data.base.DataSet` of dequantised images (see the
    module docstring): ``kind="image"``, event shape ``(1, 8, 8)``, ``meta`` with ``levels``
    (17), ``bits_per_dim_dim`` (64) and the split's settings, and ``wrap_model`` putting every
    model inside :class:`DequantizedImageModel` with the ``preprocess`` fitted on the training
    split.

    Args:
        n_train: use the first ``n_train`` of the 1257 training images (``None``: all).
        split_seed: seed of the shuffle and of the fixed dequantisation draws.
        preprocess: ``"logit"`` or ``"affine"`` (see :class:`ImagePreprocess`).
        alpha: the logit's margin.

    Returns:
        The data set.

    Example:
        >>> from freeflows.data.digits import load_digits
        >>> data = load_digits()
        >>> data.event_shape, len(data.train), len(data.val), len(data.test)
        ((1, 8, 8), 1257, 180, 360)
    """
    if n_train is not None and (
        isinstance(n_train, bool) or not isinstance(n_train, int) or not 1 <= n_train <= N_TRAIN
    ):
        raise ValueError(f"digits: n_train must be between 1 and {N_TRAIN}, got {n_train}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise ValueError(f"digits: split_seed must be an integer, got {split_seed!r}")
    if preprocess not in PREPROCESS:
        raise ValueError(f"digits: unknown preprocess {preprocess!r}; choose one of {', '.join(PREPROCESS)}")
    values = digit_values()
    if values.shape[0] != N_TRAIN + N_VAL + N_TEST:
        raise RuntimeError(f"scikit-learn's digits have {values.shape[0]} images, expected 1797")
    noise = torch.Generator().manual_seed(split_seed * 7919 + 1)
    x = dequantize(values, noise)
    train_idx, val_idx, test_idx = _split_indices(split_seed)
    train_idx = train_idx[: n_train or N_TRAIN]
    train = Split(x[train_idx])
    transform = ImagePreprocess.fit(train.x, preprocess, alpha)

    def wrap(model: nn.Module) -> nn.Module:
        return DequantizedImageModel(model, transform)

    return DataSet(
        name="digits",
        train=train,
        val=Split(x[val_idx]),
        test=Split(x[test_idx]),
        event_shape=EVENT_SHAPE,
        kind="image",
        meta={
            "levels": LEVELS,
            "bits_per_dim_dim": int(math.prod(EVENT_SHAPE)),
            "split_seed": split_seed,
            "preprocess": preprocess,
        },
        wrap_model=wrap,
    )
