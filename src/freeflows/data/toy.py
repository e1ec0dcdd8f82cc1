r"""Toy data sets with known samplers, generated (never downloaded).

2-D: ``two-moons``, ``eight-gaussians``, ``checkerboard``, ``pinwheel``, ``two-spirals``,
``rings``. 1-D: ``gaussian-mixture-1d``. The two Gaussian mixtures also expose their exact density,
so that :math:`\mathrm{KL}(p\,\|\,q) = \mathbb E_p[\log p - \log q]` to the truth can be reported.

Each sampler is ``fn(n, generator) -> Tensor[n, D]`` and is deterministic given the generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import DataSet, Split

Sampler = Callable[[int, torch.Generator], Tensor]


class GaussianMixture:
    r"""Isotropic Gaussian mixture :math:`p(x) = \sum_k w_k\,\mathcal N(x; \mu_k, \sigma_k^2 I)`."""

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor):
        self.means = means.double()
        self.stds = stds.double()
        self.weights = weights.double() / weights.sum()

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` draws of the mixture, as float32 (computed in float64).

        Args:
            n: number of draws.
            generator: the random generator; the draws are deterministic given it.

        Returns:
            ``Tensor[n, D]``.
        """
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * eps).float()

    def log_prob(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        r"""The exact log-density :math:`\log p(x)`, computed and returned in float64.

        Args:
            x: points, ``Tensor[n, D]``.
            c: ignored (the mixture is unconditional); there for the ``log_prob(x, c)`` signature.

        Returns:
            ``Tensor[n]``.
        """
        x = x.double()
        d = x.shape[1]
        sq = (x[:, None, :] - self.means[None]).square().sum(-1)  # [n, K]
        log_comp = -0.5 * sq / self.stds.square() - d * torch.log(self.stds) - 0.5 * d * math.log(2 * math.pi)
        return torch.logsumexp(log_comp + self.weights.log(), dim=1)


def eight_gaussians_mixture() -> GaussianMixture:
    """Eight equal-weight Gaussians on a circle of radius 2√2, std 0.5/√2 (the usual FFJORD
    scaling: centres at radius 4 with std 0.5, all divided by √2)."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = torch.stack([angles.cos(), angles.sin()], dim=1) * (4 / math.sqrt(2))
    return GaussianMixture(means, torch.full((8,), 0.5 / math.sqrt(2)), torch.ones(8))


def gaussian_mixture_1d() -> GaussianMixture:
    """A 1-D mixture of three Gaussians of unequal widths and weights (our choice of parameters):
    weights (0.3, 0.5, 0.2), means (−2.5, 0, 2.5), stds (0.4, 0.6, 0.3)."""
    return GaussianMixture(
        torch.tensor([[-2.5], [0.0], [2.5]]), torch.tensor([0.4, 0.6, 0.3]), torch.tensor([0.3, 0.5, 0.2])
    )


def two_moons(n: int, g: torch.Generator) -> Tensor:
    """Two interleaved half circles with Gaussian noise 0.1, centred and scaled by 2."""
    t = torch.rand(n, generator=g) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, t.cos(), 1 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    pts = torch.stack([x - 0.5, y - 0.25], dim=1)
    return 2 * (pts + 0.1 * torch.randn(n, 2, generator=g))


def checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on the black squares of a 4×4 board on [−4, 4]²."""
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g) * 2.0
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1) * 2


def pinwheel(n: int, g: torch.Generator, arms: int = 5) -> Tensor:
    """Five curved arms: Gaussians stretched radially and rotated by an angle growing with radius."""
    radial, tangential, rate = 0.3, 0.1, 0.25
    k = torch.randint(0, arms, (n,), generator=g)
    feats = torch.randn(n, 2, generator=g) * torch.tensor([radial, tangential])
    feats[:, 0] += 1.0
    angle = k * (2 * math.pi / arms) + rate * feats[:, 0].exp()
    rot = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], dim=1).reshape(n, 2, 2)
    return 2 * torch.einsum("nij,nj->ni", rot, feats)


def two_spirals(n: int, g: torch.Generator) -> Tensor:
    """Two interleaved Archimedean spirals with noise."""
    r = torch.sqrt(torch.rand(n, generator=g)) * 540 * (2 * math.pi) / 360
    sign = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)
    x = sign[:, None] * torch.stack([-r.cos() * r, r.sin() * r], dim=1)
    return (x + torch.rand(n, 2, generator=g) * 0.5) / 3


def rings(n: int, g: torch.Generator) -> Tensor:
    """Four concentric circles of radii 1, 2, 3, 4 (scaled to fit [−4, 4]) with noise 0.08."""
    k = torch.randint(1, 5, (n,), generator=g).float()
    t = torch.rand(n, generator=g) * 2 * math.pi
    pts = torch.stack([t.cos(), t.sin()], dim=1) * k[:, None] * 0.9
    return pts + 0.08 * torch.randn(n, 2, generator=g)


_EIGHT = eight_gaussians_mixture()
_ONE_D = gaussian_mixture_1d()

#: name -> (sampler, exact log-density or None, description)
TOY: dict[str, tuple[Sampler, Callable[..., Tensor] | None, str]] = {
    "two-moons": (two_moons, None, "two interleaved half circles (2-D)"),
    "eight-gaussians": (_EIGHT.sample, _EIGHT.log_prob, "8 Gaussians on a circle, exact density known (2-D)"),
    "checkerboard": (checkerboard, None, "uniform on a 4x4 checkerboard (2-D)"),
    "pinwheel": (pinwheel, None, "five curved arms (2-D)"),
    "two-spirals": (two_spirals, None, "two interleaved spirals (2-D)"),
    "rings": (rings, None, "four concentric rings (2-D)"),
    "gaussian-mixture-1d": (
        _ONE_D.sample,
        _ONE_D.log_prob,
        "3-component Gaussian mixture, exact density (1-D)",
    ),
}


def load_toy(
    name: str, n_train: int = 20000, n_val: int = 2000, n_test: int = 5000, seed: int = 0
) -> DataSet:
    """Draw fixed train/val/test splits of a toy data set; the splits depend only on ``seed``."""
    if name not in TOY:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY)}")
    for label, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{label} must be a positive integer, got {n!r}")
    sampler, log_prob, _ = TOY[name]
    splits = []
    for offset, n in enumerate((n_train, n_val, n_test)):
        g = torch.Generator().manual_seed(seed * 1000 + offset)
        splits.append(Split(sampler(n, g)))
    return DataSet(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        event_shape=tuple(splits[0].x.shape[1:]),
        true_log_prob=log_prob,
    )
