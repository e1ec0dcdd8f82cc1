r"""Glow's layers (Kingma & Dhariwal, 2018), on vectors ``[B, D]`` and images ``[B, C, H, W]``.

One Glow step is ActNorm, then an invertible linear map of the channels, then an affine coupling.
Axis 1 is "the channels" throughout: a vector's features or an image's channels; per-pixel maps
are shared over the spatial positions, so their log-determinants are multiplied by
:math:`H W`.

* :class:`ActNorm`: :math:`z = (x - \mu) \odot e^{\lambda}`, per channel, with :math:`\mu,
  \lambda` set from the first batch it sees so that its output has zero mean and unit variance.
* :class:`InvertibleLinear` / :class:`InvertibleConv1x1`: :math:`z = W x` with
  :math:`W = P L (U + \operatorname{diag}(\sigma \odot e^{\ell}))` (LU form: :math:`P` a fixed
  permutation, :math:`L` unit lower triangular, :math:`U` strictly upper triangular, signs
  :math:`\sigma` fixed), so :math:`\log\lvert\det W\rvert = \sum_i \ell_i` costs :math:`O(D)`.
* :class:`Squeeze`: ``[C, H, W] -> [4C, H/2, W/2]``, volume preserving.
* :class:`ImageAffineCoupling`: RealNVP's affine coupling on a channel split, conv conditioner.
* :class:`MultiScale`: the multi-scale architecture: at each level squeeze, ``steps`` Glow steps,
  then factor out half of the channels (they go straight to the latent).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import ComposedTransform, Transform, check_image
from .conditioner import ConvNet
from .coupling import soft_clamp


def _spatial(x: Tensor) -> int:
    return int(math.prod(x.shape[2:]))


def _per_channel(p: Tensor, x: Tensor) -> Tensor:
    return p.reshape(1, -1, *([1] * (x.dim() - 2)))


class ActNorm(Transform):
    r"""Per-channel affine normalisation with a data-dependent initialisation:

    .. math:: z = (x - \mu) \odot e^{\lambda}, \qquad
       \log\lvert\det J\rvert = H W \textstyle\sum_c \lambda_c

    (``H W = 1`` for vectors). The first ``forward`` sets :math:`\mu` to the batch mean and
    :math:`e^{-\lambda}` to the batch standard deviation, floored at ``min_std`` so that a
    constant feature gives a finite scale (never a NaN). Under ``torch.distributed`` the
    statistics are averaged over processes, so that every replica starts identical. The
    ``initialized`` flag is saved in the state dict; an ActNorm used for sampling before it has
    seen data is the identity.

    Args:
        channels: size of axis 1 (features of vectors, channels of images).
        min_std: floor of the initial standard deviation.

    References:
        Kingma and Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
        arXiv:1807.03039.

    Example:
        >>> import torch
        >>> from freeflows.transforms import ActNorm
        >>> _ = torch.manual_seed(0)
        >>> t = ActNorm(2)
        >>> z, log_det = t(3 + 2 * torch.randn(1000, 2))  # the first batch sets mu and lambda
        >>> bool(z.mean(0).abs().max() < 1e-5), bool((z.std(0, unbiased=False) - 1).abs().max() < 1e-5)
        (True, True)
    """

    def __init__(self, channels: int, min_std: float = 1e-3) -> None:
        super().__init__()
        if channels < 1 or not min_std > 0:
            raise ValueError(f"ActNorm needs channels >= 1 and min_std > 0, got {channels}, {min_std}")
        self.channels = channels
        self.min_std = min_std
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"ActNorm of {self.channels} channels got input of shape {tuple(x.shape)}")

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        r"""Set :math:`\mu` and :math:`\lambda` so that ``x`` is normalised to zero mean and unit
        variance per channel (``forward`` calls it on its first batch).

        Args:
            x: a batch ``[B, channels, ...]``.
        """
        dims = [d for d in range(x.dim()) if d != 1]
        moments = torch.stack([x.mean(dim=dims), x.square().mean(dim=dims)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
            moments /= dist.get_world_size()
        mean, square = moments
        std = (square - mean.square()).clamp_min(0).sqrt().clamp_min(self.min_std)
        self.loc.copy_(mean)
        self.log_scale.copy_(-torch.log(std))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Data to latent, :math:`z = (x - \mu) \odot e^{\lambda}` (initialising on the first
        call).

        Args:
            x: data ``[B, channels, ...]``.
            c: ignored.

        Returns:
            ``(z, log_det)``, shaped like ``x`` and ``[B]``.
        """
        self._check(x)
        if not self.initialized:
            self.initialize(x)
        z = (x - _per_channel(self.loc, x)) * torch.exp(_per_channel(self.log_scale, x))
        return z, (self.log_scale.sum() * _spatial(x)).expand(x.shape[0])

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        r"""Latent to data, :math:`x = z \odot e^{-\lambda} + \mu`.

        Args:
            z: latent points ``[B, channels, ...]``.
            c: ignored.

        Returns:
            The data points, shaped like ``z``.
        """
        self._check(z)
        return z * torch.exp(-_per_channel(self.log_scale, z)) + _per_channel(self.loc, z)


class InvertibleLinear(Transform):
    r"""An invertible linear map of axis 1 in LU form,

    .. math:: z = W x, \qquad W = P L \bigl(U + \operatorname{diag}(\sigma \odot e^{\ell})\bigr),
       \qquad \log\lvert\det W\rvert = \textstyle\sum_i \ell_i ,

    with :math:`P` a fixed permutation, :math:`L` unit lower triangular, :math:`U` strictly upper
    triangular and the signs :math:`\sigma` fixed; :math:`W` starts at a random rotation. The
    log-determinant costs :math:`O(D)` and the inverse is two triangular solves. This class
    takes vectors ``[B, D]``; :class:`InvertibleConv1x1` applies it to the channels of images.

    Args:
        features: ``D``.

    References:
        Kingma and Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
        arXiv:1807.03039.

    Example:
        >>> import torch
        >>> from freeflows.transforms import InvertibleLinear
        >>> t = InvertibleLinear(3)
        >>> x = torch.randn(4, 3)
        >>> z, log_det = t(x)
        >>> torch.allclose(log_det, torch.linalg.slogdet(t.weight()).logabsdet.expand(4), atol=1e-5)
        True
        >>> torch.allclose(t.inverse(z), x, atol=1e-5)
        True
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        self.features = features
        q = torch.linalg.qr(torch.randn(features, features, dtype=torch.float64)).Q
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("permutation", p.float())
        self.register_buffer("sign", torch.sign(diag).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(features, features), -1))
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_abs_diag = nn.Parameter(torch.log(diag.abs()).float())

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(
                f"InvertibleLinear expects vectors of shape [batch, {self.features}], got {tuple(x.shape)}"
            )

    def factors(self) -> tuple[Tensor, Tensor]:
        r"""The triangular factors :math:`(L, U')` with :math:`W = P L U'`, each ``[D, D]``:
        :math:`L` unit lower triangular, :math:`U' = U + \operatorname{diag}(\sigma \odot
        e^{\ell})` upper triangular."""
        eye = torch.eye(self.features, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * torch.exp(self.log_abs_diag))
        return lower, upper

    def weight(self) -> Tensor:
        """The matrix :math:`W = P L U'`, ``[D, D]``."""
        lower, upper = self.factors()
        return self.permutation @ lower @ upper

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Data to latent, :math:`z = W x` (at every position of an image).

        Args:
            x: data ``[B, D]`` (or ``[B, D, H, W]`` for :class:`InvertibleConv1x1`).
            c: ignored.

        Returns:
            ``(z, log_det)`` with :math:`\log\lvert\det\rvert = H W \sum_i \ell_i`, shaped like
            ``x`` and ``[B]``.
        """
        self._check(x)
        z = torch.einsum("ij,bj...->bi...", self.weight(), x)
        return z, (self.log_abs_diag.sum() * _spatial(x)).expand(x.shape[0])

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        r"""Latent to data, :math:`x = W^{-1} z` by two triangular solves.

        Args:
            z: latent points ``[B, D]`` (or ``[B, D, H, W]`` for :class:`InvertibleConv1x1`).
            c: ignored.

        Returns:
            The data points, shaped like ``z``.
        """
        self._check(z)
        lower, upper = self.factors()
        cols = z.movedim(1, -1).reshape(-1, self.features).T  # [D, N]: one column per position
        y = torch.linalg.solve_triangular(lower, self.permutation.T @ cols, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper, y, upper=True)
        return x.T.reshape(*z.movedim(1, -1).shape).movedim(-1, 1)


class InvertibleConv1x1(InvertibleLinear):
    r"""Glow's invertible 1×1 convolution: :class:`InvertibleLinear` of the channels of
    ``[B, C, H, W]``, shared over pixels; log-determinant :math:`H W \sum_i \ell_i`.

    Args:
        features: the number of channels ``C``.

    References:
        Kingma and Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
        arXiv:1807.03039.

    Example:
        >>> import torch
        >>> from freeflows.transforms import InvertibleConv1x1
        >>> t = InvertibleConv1x1(3)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> z, log_det = t(x)
        >>> z.shape, torch.allclose(log_det, 16 * t.log_abs_diag.sum().expand(2))
        (torch.Size([2, 3, 4, 4]), True)
        >>> torch.allclose(t.inverse(z), x, atol=1e-5)
        True
    """

    def _check(self, x: Tensor) -> None:
        check_image(x, self.features, "InvertibleConv1x1")


class Squeeze(Transform):
    """``[B, C, H, W] -> [B, 4C, H/2, W/2]``: each 2×2 block of pixels becomes 4 channels (a
    permutation, so the log-determinant is zero).

    References:
        Dinh, Sohl-Dickstein and Bengio, "Density estimation using Real NVP" (2016),
        arXiv:1605.08803.

    Example:
        >>> import torch
        >>> from freeflows.transforms import Squeeze
        >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> z, log_det = Squeeze()(x)
        >>> z.flatten(), log_det
        (tensor([0., 1., 2., 3.]), tensor([0.]))
        >>> Squeeze().inverse(z).shape
        torch.Size([1, 1, 2, 2])
    """

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to latent: fold each 2×2 block of pixels into the channels.

        Args:
            x: images ``[B, C, H, W]`` with even ``H`` and ``W``.
            c: ignored.

        Returns:
            ``(z, zeros)``, ``[B, 4C, H/2, W/2]`` and ``[B]``.
        """
        if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"Squeeze needs images [batch, C, H, W] with even H and W, got {tuple(x.shape)}")
        b, ch, h, w = x.shape
        z = (
            x.reshape(b, ch, h // 2, 2, w // 2, 2)
            .permute(0, 1, 3, 5, 2, 4)
            .reshape(b, 4 * ch, h // 2, w // 2)
        )
        return z, x.new_zeros(b)

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """Latent to data: unfold groups of 4 channels into 2×2 blocks of pixels.

        Args:
            z: ``[B, 4C, H, W]``.
            c: ignored.

        Returns:
            Images ``[B, C, 2H, 2W]``.
        """
        if z.dim() != 4 or z.shape[1] % 4:
            raise ValueError(f"Squeeze.inverse needs [batch, 4C, H, W], got {tuple(z.shape)}")
        b, ch, h, w = z.shape
        return z.reshape(b, ch // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, ch // 4, 2 * h, 2 * w)


class ImageAffineCoupling(Transform):
    r"""Affine coupling of images on a channel split: the first ``C // 2`` channels :math:`x_a`
    pass through and the others become

    .. math:: z_b = x_b \odot e^{s} + t, \qquad (\tilde s, t) = \mathrm{ConvNet}(x_a, c),
       \qquad s = \kappa \tanh(\tilde s / \kappa),

    with :math:`\log\lvert\det J\rvert = \sum s` over channels and pixels. The conditioner is a
    :class:`~freeflows.transforms.conditioner.ConvNet` whose last layer starts at zero, so the
    coupling starts as the identity.

    Args:
        channels: ``C >= 2``.
        hidden: channels of the conditioner's hidden layers.
        condition_dim: features of the condition ``c``, or ``None``.
        clamp: :math:`\kappa > 0`, the bound of the log-scale; ``None`` for no clamp.

    References:
        Dinh, Sohl-Dickstein and Bengio, "Density estimation using Real NVP" (2016),
        arXiv:1605.08803.

    Example:
        >>> import torch
        >>> from freeflows.transforms import ImageAffineCoupling
        >>> t = ImageAffineCoupling(4, hidden=8)
        >>> x = torch.randn(2, 4, 4, 4)
        >>> z, log_det = t(x)
        >>> z.shape, log_det.shape, torch.allclose(t.inverse(z), x)
        (torch.Size([2, 4, 4, 4]), torch.Size([2]), True)
    """

    def __init__(
        self, channels: int, hidden: int = 64, condition_dim: int | None = None, clamp: float | None = 3.0
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"an image coupling needs at least 2 channels, got {channels} (squeeze first)")
        self.channels = channels
        self.n_a = channels // 2
        self.clamp = clamp
        self.net = ConvNet(self.n_a, 2 * (channels - self.n_a), hidden, condition_dim)

    def _scale_shift(self, a: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        s, t = self.net(a, c).chunk(2, dim=1)
        return soft_clamp(s, self.clamp), t

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Data to latent, :math:`z_b = x_b \odot e^{s(x_a, c)} + t(x_a, c)`.

        Args:
            x: images ``[B, C, H, W]``.
            c: conditions ``[B, condition_dim]``, or ``None``.

        Returns:
            ``(z, log_det)``, ``[B, C, H, W]`` and ``[B]``.
        """
        check_image(x, self.channels, "ImageAffineCoupling")
        a, b = x[:, : self.n_a], x[:, self.n_a :]
        s, t = self._scale_shift(a, c)
        return torch.cat([a, b * torch.exp(s) + t], dim=1), s.reshape(x.shape[0], -1).sum(dim=1)

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        r"""Latent to data, :math:`x_b = (z_b - t(z_a, c)) \odot e^{-s(z_a, c)}`.

        Args:
            z: ``[B, C, H, W]``.
            c: conditions ``[B, condition_dim]``, or ``None``.

        Returns:
            Images ``[B, C, H, W]``.
        """
        check_image(z, self.channels, "ImageAffineCoupling")
        a, b = z[:, : self.n_a], z[:, self.n_a :]
        s, t = self._scale_shift(a, c)
        return torch.cat([a, (b - t) * torch.exp(-s)], dim=1)


def glow_image_step(
    channels: int, hidden: int, condition_dim: int | None, clamp: float | None, min_std: float
) -> ComposedTransform:
    """One Glow step on images: :class:`ActNorm`, :class:`InvertibleConv1x1`, then
    :class:`ImageAffineCoupling`.

    Args:
        channels: channels ``C`` of the images.
        hidden: channels of the coupling's conditioner.
        condition_dim: features of the condition, or ``None``.
        clamp: bound of the coupling's log-scale, or ``None``.
        min_std: floor of ActNorm's initial standard deviation.

    References:
        Kingma and Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
        arXiv:1807.03039.

    Example:
        >>> from freeflows.transforms.glow import glow_image_step
        >>> [type(t).__name__ for t in glow_image_step(4, 8, None, 3.0, 1e-3).transforms]
        ['ActNorm', 'InvertibleConv1x1', 'ImageAffineCoupling']
    """
    return ComposedTransform(
        ActNorm(channels, min_std),
        InvertibleConv1x1(channels),
        ImageAffineCoupling(channels, hidden, condition_dim, clamp),
    )


class MultiScale(Transform):
    r"""Glow's multi-scale architecture on images of shape ``event_shape = (C, H, W)``.

    Level :math:`k = 1..L`: squeeze, then ``steps`` Glow steps (:func:`glow_image_step`); except
    at the last level, half of the channels are factored out and sent to the latent. The latent
    is the concatenation of all factored-out parts and the final output, flattened and reshaped
    to ``(C, H, W)`` (a fixed rearrangement, so a standard normal latent on ``(C, H, W)`` is the
    usual multi-scale prior). ``H`` and ``W`` must be divisible by :math:`2^L`.

    Args:
        event_shape: ``(C, H, W)``.
        levels: :math:`L \ge 1`.
        steps: Glow steps per level.
        hidden: channels of the couplings' conditioners.
        condition_dim: features of the condition ``c``, or ``None``.
        clamp: bound of the couplings' log-scales, or ``None``.
        min_std: floor of ActNorm's initial standard deviation.

    References:
        Dinh, Sohl-Dickstein and Bengio, "Density estimation using Real NVP" (2016),
        arXiv:1605.08803. Kingma and Dhariwal, "Glow: Generative Flow with Invertible 1x1
        Convolutions" (2018), arXiv:1807.03039.

    Example:
        >>> import torch
        >>> from freeflows.transforms import MultiScale
        >>> t = MultiScale((1, 4, 4), levels=2, steps=1, hidden=8)
        >>> x = torch.randn(3, 1, 4, 4)
        >>> z, log_det = t(x)
        >>> z.shape, log_det.shape, torch.allclose(t.inverse(z), x, atol=1e-5)
        (torch.Size([3, 1, 4, 4]), torch.Size([3]), True)
    """

    def __init__(
        self,
        event_shape: tuple[int, int, int],
        levels: int = 2,
        steps: int = 4,
        hidden: int = 64,
        condition_dim: int | None = None,
        clamp: float | None = 3.0,
        min_std: float = 1e-3,
    ) -> None:
        super().__init__()
        if len(event_shape) != 3:
            raise ValueError(f"MultiScale needs an image event shape (C, H, W), got {tuple(event_shape)}")
        ch, h, w = (int(s) for s in event_shape)
        if levels < 1 or steps < 1:
            raise ValueError(f"levels and steps must be >= 1, got {levels}, {steps}")
        if h % 2**levels or w % 2**levels:
            raise ValueError(f"image size {h}x{w} is not divisible by 2**levels = {2**levels}")
        self.event_shape = (ch, h, w)
        self.levels = nn.ModuleList()
        self.factored: list[int] = []  # channels factored out after each level
        self.shapes: list[tuple[int, int, int]] = []  # shape after each level's squeeze
        for k in range(levels):
            ch, h, w = 4 * ch, h // 2, w // 2
            steps_k = [glow_image_step(ch, hidden, condition_dim, clamp, min_std) for _ in range(steps)]
            self.levels.append(ComposedTransform(Squeeze(), *steps_k))
            self.shapes.append((ch, h, w))
            out = ch // 2 if k < levels - 1 else 0
            self.factored.append(out)
            ch -= out

    def _check(self, x: Tensor, name: str) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(
                f"{name} expects images of shape [batch, {', '.join(map(str, self.event_shape))}], "
                f"got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to latent through every level, factoring out half of the channels after each
        level but the last.

        Args:
            x: images ``[B, C, H, W]``.
            c: conditions ``[B, condition_dim]``, or ``None``.

        Returns:
            ``(z, log_det)``, ``[B, C, H, W]`` and ``[B]``.
        """
        self._check(x, "MultiScale")
        log_det = x.new_zeros(x.shape[0])
        parts = []
        h = x
        for level, out in zip(self.levels, self.factored, strict=True):
            h, ld = level(h, c)
            log_det = log_det + ld
            parts.append(h[:, :out].reshape(x.shape[0], -1))
            h = h[:, out:]
        parts.append(h.reshape(x.shape[0], -1))
        return torch.cat(parts, dim=1).reshape(x.shape), log_det

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """Latent to data: the levels in reverse, re-attaching the factored-out channels.

        Args:
            z: latent points ``[B, C, H, W]``.
            c: conditions ``[B, condition_dim]``, or ``None``.

        Returns:
            Images ``[B, C, H, W]``.
        """
        self._check(z, "MultiScale.inverse")
        sizes = [out * h * w for out, (_, h, w) in zip(self.factored, self.shapes, strict=True)]
        sizes.append(z[0].numel() - sum(sizes))
        parts = z.reshape(z.shape[0], -1).split(sizes, dim=1)
        ch, h, w = self.shapes[-1]
        x = parts[-1].reshape(z.shape[0], ch, h, w)
        for k in reversed(range(len(self.levels))):
            out, (ch, h, w) = self.factored[k], self.shapes[k]
            if out:
                x = torch.cat([parts[k].reshape(z.shape[0], out, h, w), x], dim=1)
            x = self.levels[k].inverse(x, c)
        return x
