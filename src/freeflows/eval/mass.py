r"""The mass of a density model: :math:`M = \int \exp(\log q(x))\,dx` over the data space.

A normalised density has :math:`M = 1`. This module estimates :math:`M` for any ``log_prob``
callable, which checks that a model's log-density is normalised (every exact flow and the CNF
must give 1 within the error) and measures how far a value that is not normalised is off (the
free-form paper's :math:`\log p_Z(f(x)) - \log\lvert\det J_g(f(x))\rvert`). A normalised
negative log-likelihood of an unnormalised :math:`\log q` is then :math:`\mathrm{NLL} + \log M`.

**Coordinates.** When the model's support is an :math:`m`-dimensional linear subspace with
orthonormal basis :math:`Q \in \mathbb R^{D \times m}` (a mean-free latent's ``basis``), points
are :math:`x = Q y`, :math:`y \in \mathbb R^m`, and :math:`M = \int q(Qy)\,dy` is the mass with
respect to the subspace's Lebesgue measure, the measure in which such models' ``log_prob`` is a
density. Otherwise :math:`Q = I` and :math:`m = D`.

**Quadrature** (:math:`m \le 2`, :func:`quadrature_mass`). The trapezoid rule on a grid of
``nodes`` per axis over the box :math:`[\min_i y_i - a s, \max_i y_i + a s]` (per axis, from
the data's range and standard deviation :math:`s`, margin :math:`a = 3`). Its error estimate,
reported as ``stderr``, is the sum of two parts, both from the same evaluations:

* resolution: :math:`\lvert M_h - M_{2h} \rvert`, the change when every other node is dropped (the
  trapezoid rule on the half-resolution grid). For a smooth density the error of :math:`M_h`
  is much smaller than this difference (:math:`\tfrac13` of it when the error is
  :math:`O(h^2)`);
* truncation: the mass outside the box, extrapolated geometrically from the masses of two thin
  shells at the box's edge (:func:`quadrature_mass`). This bounds the mass outside when the
  tails decay at least geometrically (log-concave tails do), not for arbitrarily heavy tails; it
  is infinite when the outer shell holds as much mass as the inner one.

**Importance sampling** (:math:`m > 2`, :func:`importance_mass`). Draws :math:`y_k \sim r`
from a proposal that covers the data: by default a mixture of Gaussians fitted to the data's
coordinates, with covariance :math:`1.5\,\hat\Sigma` (weight 0.75) and the defensive
:math:`4\,\hat\Sigma` (weight 0.25, which bounds the weights where the model's tails are wider
than the data's). Then

.. math:: \hat M = \frac1n \sum_k w_k,\quad w_k = \frac{q(Qy_k)}{r(y_k)},\qquad
          \mathrm{stderr} = \frac{\operatorname{sd}(w)}{\sqrt n},

with :math:`\hat M` unbiased, computed from the log-weights with the largest one factored out
(no overflow). The stderr is exact only when :math:`w` has a finite variance; mass far outside
the proposal is missed by any finite sample. The effective sample size
:math:`(\sum w)^2/\sum w^2` is reported with the estimate: when it is a small fraction of
:math:`n` (a few draws carry the sum, as for a Gaussian proposal against images in 64
dimensions), neither :math:`\hat M` nor its stderr can be trusted.

**Unsolved points.** A ``log_prob`` that returns NaN for a point (a free-form flow's root solve
that did not converge) contributes zero, and the count is reported as ``unsolved``: the estimate
is then a lower bound on the mass of the density that the solve would define.

Everything is evaluated under :func:`torch.no_grad`, like validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

F64 = torch.float64
LOG_TWO_PI = math.log(2 * math.pi)

#: Default log_prob evaluations: trapezoid nodes in 1-D, nodes per axis in 2-D, draws above.
DEFAULT_NODES = {1: 2001, 2: 201}
DEFAULT_DRAWS = 4000
#: Width of the two shells at the box's edge that the tail estimate compares, as a fraction of
#: the margin between the data's range and the box.
SHELL = 0.2


@dataclass(frozen=True)
class MassEstimate:
    r"""An estimate of :math:`M = \int q`.

    Attributes:
        mass: the estimate :math:`\hat M`.
        stderr: its standard error (importance sampling) or error estimate (quadrature; see the
            module docstring).
        n: number of ``log_prob`` evaluations.
        unsolved: how many of them returned NaN and were counted as zero density.
        method: ``"quadrature"`` or ``"importance"``.
        ess: importance sampling's effective sample size :math:`(\sum_k w_k)^2 / \sum_k w_k^2`
            (``None`` for quadrature). Far below ``n`` (a few draws carry the estimate), the
            estimate and its ``stderr`` are not reliable, whatever ``stderr`` says.
    """

    mass: float
    stderr: float
    n: int
    unsolved: int
    method: str
    ess: float | None = None

    @property
    def log_mass(self) -> float:
        r""":math:`\log \hat M`, the amount to add to an NLL of this density to normalise it."""
        return math.log(self.mass) if self.mass > 0 else -math.inf

    @property
    def log_mass_stderr(self) -> float:
        r"""Error of :math:`\log \hat M` to first order, :math:`\mathrm{stderr}/\hat M`."""
        return self.stderr / self.mass if self.mass > 0 else math.inf


def combine_masses(estimates: Sequence[MassEstimate]) -> MassEstimate:
    r"""The mean of independent estimates (e.g. of :math:`\int q(x \mid c_j)\,dx` for several
    conditions :math:`c_j`), with standard error :math:`\sqrt{\sum_j s_j^2}/J`; counts add up."""
    if not estimates:
        raise ValueError("combine_masses needs at least one estimate")
    k = len(estimates)
    methods = {e.method for e in estimates}
    return MassEstimate(
        mass=sum(e.mass for e in estimates) / k,
        stderr=math.sqrt(sum(e.stderr**2 for e in estimates)) / k,
        n=sum(e.n for e in estimates),
        unsolved=sum(e.unsolved for e in estimates),
        method=methods.pop() if len(methods) == 1 else "mixed",
        ess=None if any(e.ess is None for e in estimates) else sum(e.ess for e in estimates),
    )


class GaussianMixtureProposal:
    r"""A mixture :math:`r(y) = \sum_k \pi_k\, \mathcal N(y; \mu_k, L_k L_k^\top)` on
    :math:`\mathbb R^m` (float64), the proposal of :func:`importance_mass`.

    Args:
        means: the component means ``[m]``.
        chols: lower-triangular Cholesky factors ``[m, m]`` of the covariances.
        weights: the mixture weights (normalised here).
    """

    def __init__(self, means: Sequence[Tensor], chols: Sequence[Tensor], weights: Sequence[float]):
        if not (len(means) == len(chols) == len(weights)) or not means:
            raise ValueError("a mixture needs as many means, Cholesky factors and weights, at least one")
        w = torch.as_tensor([float(v) for v in weights], dtype=F64)
        if (w < 0).any() or not w.sum() > 0:
            raise ValueError(f"mixture weights must be non-negative and not all zero, got {list(weights)}")
        self.means = [m.to(F64) for m in means]
        self.chols = [c.to(F64) for c in chols]
        self.weights = w / w.sum()
        self.dim = int(self.means[0].shape[0])

    @classmethod
    def fit(
        cls,
        y: Tensor,
        scales: Sequence[float] = (1.5, 4.0),
        weights: Sequence[float] = (0.75, 0.25),
        ridge: float = 1e-6,
    ) -> GaussianMixtureProposal:
        r"""Components :math:`\mathcal N(\hat\mu, s_k \hat\Sigma)`, one per scale :math:`s_k`,
        with :math:`\hat\mu, \hat\Sigma` the mean and covariance of the rows of ``y`` ``[N, m]``
        (plus ``ridge`` times the mean variance on the diagonal, so that a degenerate sample still
        gives a proper Gaussian; the identity if ``N < 2``)."""
        if len(scales) != len(weights) or any(not s > 0 for s in scales):
            raise ValueError(f"need one positive scale per weight, got scales {scales} and weights {weights}")
        y = y.to(F64)
        m = y.shape[1]
        mu = y.mean(dim=0) if y.shape[0] else y.new_zeros(m)
        if y.shape[0] < 2:
            cov = torch.eye(m, dtype=F64)
        else:
            cov = torch.atleast_2d(torch.cov(y.T))
            cov = cov + (ridge * cov.diagonal().mean() + 1e-12) * torch.eye(m, dtype=F64)
        chol = torch.linalg.cholesky(cov)
        return cls([mu] * len(scales), [chol * math.sqrt(s) for s in scales], weights)

    def mixed_with(self, other: GaussianMixtureProposal, fraction: float) -> GaussianMixtureProposal:
        """The mixture ``(1 - fraction) * self + fraction * other``."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        weights = [(1 - fraction) * float(w) for w in self.weights]
        weights += [fraction * float(w) for w in other.weights]
        return GaussianMixtureProposal(self.means + other.means, self.chols + other.chols, weights)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws ``[n, m]`` (float64, CPU): a component per draw, then its Gaussian."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=F64, generator=generator)
        y = torch.empty(n, self.dim, dtype=F64)
        for k, (mu, chol) in enumerate(zip(self.means, self.chols, strict=True)):
            rows = comp == k
            y[rows] = mu + eps[rows] @ chol.T
        return y

    def log_prob(self, y: Tensor) -> Tensor:
        r""":math:`\log r(y)` ``[B]`` of rows ``y`` ``[B, m]``."""
        y = y.to(F64)
        parts = []
        for w, mu, chol in zip(self.weights, self.means, self.chols, strict=True):
            r = torch.linalg.solve_triangular(chol, (y - mu).T, upper=False)
            log_det = chol.diagonal().log().sum()
            parts.append(w.log() - 0.5 * r.square().sum(dim=0) - log_det - 0.5 * self.dim * LOG_TWO_PI)
        return torch.logsumexp(torch.stack(parts), dim=0)


def _evaluate(log_density: Callable[[Tensor], Tensor], y: Tensor, batch_size: int) -> Tensor:
    """``log_density`` of the rows of ``y`` in batches, as float64 ``[N]``, without a graph."""
    out = []
    with torch.no_grad():
        for i in range(0, y.shape[0], batch_size):
            out.append(log_density(y[i : i + batch_size]).detach().reshape(-1).to("cpu", F64))
    return torch.cat(out)


def quadrature_mass(
    log_density: Callable[[Tensor], Tensor],
    lo: Sequence[float],
    hi: Sequence[float],
    nodes: int,
    core: tuple[Sequence[float], Sequence[float]] | None = None,
    batch_size: int = 4096,
) -> MassEstimate:
    r"""Trapezoid rule for :math:`\int_{[lo, hi]} e^{\ell(y)}\,dy` in 1 or 2 dimensions.

    Args:
        log_density: :math:`\ell`, mapping float64 rows ``[B, m]`` to ``[B]`` (NaN = unsolved).
        lo, hi: the box's corners, one value per axis.
        nodes: nodes per axis, odd and at least 3 (so that every other node is a grid too).
        core: corners of a box inside ``[lo, hi]`` (the data's range), for the truncation part
            of the error; ``None`` leaves that part out.
        batch_size: grid points per call of ``log_density``.

    Returns:
        The fine-grid estimate :math:`M_h`, with the error estimate ``resolution + tail``:

        * resolution :math:`\lvert M_h - M_{2h}\rvert` (every other node dropped);
        * tail: with :math:`s_0, s_1` the masses of the two shells of width ``SHELL`` (a fraction
          of the way from the core to ``[lo, hi]``) at the box's edge, inner and outer, the
          geometric extrapolation :math:`s_1\,r/(1-r)`, :math:`r = s_1/s_0`, of the mass outside.
          It is an upper bound when shell masses keep shrinking at least by the factor :math:`r`
          further out (as for log-concave tails) and infinite when :math:`r \ge 1` (the box does
          not hold the mass); tails that decay ever more slowly (a mixture of scales, as in
          coupling flows with random weights) can exceed it by a few times.

        A feature narrower than the node spacing can fall between all nodes and be missed by
        both grids; the default 201 nodes per axis over the data's range plus 3 standard
        deviations either side make that unlikely for a density fitted to the data.
    """
    m = len(lo)
    if m not in (1, 2) or len(hi) != m:
        raise ValueError(f"quadrature needs 1 or 2 dimensions with one bound per axis, got {lo}, {hi}")
    if nodes < 3 or nodes % 2 == 0:
        raise ValueError(f"nodes must be odd and at least 3, got {nodes}")
    if any(not h > low for low, h in zip(lo, hi, strict=True)):
        raise ValueError(f"the box must have hi > lo on every axis, got {lo}, {hi}")
    axes = [torch.linspace(float(a), float(b), nodes, dtype=F64) for a, b in zip(lo, hi, strict=True)]

    def trapezoid(axis: Tensor) -> Tensor:
        w = torch.full_like(axis, float(axis[1] - axis[0]))
        w[0] = w[-1] = 0.5 * w[0]
        return w

    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, m)
    log_f = _evaluate(log_density, grid, batch_size)
    unsolved = torch.isnan(log_f)
    f = torch.where(unsolved, torch.zeros_like(log_f), log_f.exp()).reshape([nodes] * m)

    def integrate(values: Tensor, grid_axes: list[Tensor]) -> float:
        weights = trapezoid(grid_axes[0])
        if m == 2:
            weights = weights[:, None] * trapezoid(grid_axes[1])[None, :]
        return float((weights * values).sum())

    def within(a: Sequence[float], b: Sequence[float]) -> float:
        """The fine grid's mass of the nodes inside the box ``[a, b]``."""
        inside = torch.ones_like(f, dtype=torch.bool)
        for i, axis in enumerate(axes):
            shape = [1] * m
            shape[i] = nodes
            inside = inside & ((axis >= a[i]) & (axis <= b[i])).reshape(shape)
        return integrate(torch.where(inside, f, torch.zeros_like(f)), axes)

    fine = integrate(f, axes)
    coarse = integrate(f[::2, ::2] if m == 2 else f[::2], [a[::2] for a in axes])
    tail = 0.0
    if core is not None:

        def towards(t: float) -> tuple[list[float], list[float]]:
            """The box a fraction ``t`` of the way from the core to ``[lo, hi]``."""
            return (
                [c + t * (a - c) for a, c in zip(lo, core[0], strict=True)],
                [c + t * (b - c) for b, c in zip(hi, core[1], strict=True)],
            )

        in_core, in_mid = within(*towards(1 - 2 * SHELL)), within(*towards(1 - SHELL))
        s0, s1 = max(in_mid - in_core, 0.0), max(fine - in_mid, 0.0)
        if s1 <= 1e-12 * max(fine, 1e-300):
            tail = s1
        elif s1 >= s0:
            tail = math.inf
        else:
            tail = s1 * s1 / (s0 - s1)
    error = abs(fine - coarse) + tail
    return MassEstimate(fine, error, int(grid.shape[0]), int(unsolved.sum()), "quadrature")


def importance_mass(
    log_density: Callable[[Tensor], Tensor],
    proposal: GaussianMixtureProposal,
    n: int,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> MassEstimate:
    r"""Importance sampling for :math:`\int e^{\ell(y)}\,dy` with ``n`` draws from ``proposal``:
    :math:`\hat M = \frac1n\sum_k e^{\ell(y_k) - \log r(y_k)}` and standard error
    :math:`\operatorname{sd}(w)/\sqrt n` (sample standard deviation), computed with the largest
    log-weight factored out. NaN values of :math:`\ell` are zero weights, counted in ``unsolved``.
    """
    if n < 2:
        raise ValueError(f"importance sampling needs at least 2 draws, got {n}")
    y = proposal.sample(n, generator)
    log_w = _evaluate(log_density, y, batch_size) - proposal.log_prob(y)
    unsolved = torch.isnan(log_w)
    log_w = torch.where(unsolved, torch.full_like(log_w, -math.inf), log_w)
    top = log_w.max()
    if torch.isneginf(top):
        mass, stderr, ess = 0.0, 0.0, 0.0
    elif torch.isposinf(top):
        mass, stderr, ess = math.inf, math.inf, 0.0
    else:
        w = (log_w - top).exp()
        scale = math.exp(float(top))
        mass = float(w.mean()) * scale
        stderr = float(w.std()) * scale / math.sqrt(n)
        ess = float(w.sum() ** 2 / (w**2).sum())
    return MassEstimate(mass, stderr, n, int(unsolved.sum()), "importance", ess)


def _coordinates(x: Tensor, basis: Tensor | None) -> Tensor:
    """Rows ``[N, m]`` (float64, CPU) of the points' coordinates in the basis (or flattened)."""
    flat = x.detach().reshape(x.shape[0], -1).to("cpu", F64)
    flat = flat[torch.isfinite(flat).all(dim=1)]
    return flat if basis is None else flat @ basis.detach().to("cpu", F64)


def density_mass(
    log_prob: Callable[[Tensor], Tensor],
    data: Tensor,
    *,
    basis: Tensor | None = None,
    evaluations: int | None = None,
    method: Literal["auto", "quadrature", "importance"] = "auto",
    margin: float = 3.0,
    scales: Sequence[float] = (1.5, 4.0),
    weights: Sequence[float] = (0.75, 0.25),
    extra: Tensor | None = None,
    extra_fraction: float = 0.2,
    batch_size: int = 1024,
    seed: int = 0,
) -> MassEstimate:
    r""":math:`\int \exp(\mathtt{log\_prob}(x))\,dx` over the data space (see the module docstring).

    Args:
        log_prob: maps points ``[B, *event]`` (``data``'s dtype and device) to ``[B]``; NaN marks
            a point where the density could not be computed (counted as zero, and ``unsolved``).
        data: points ``[N, *event]`` that the box or the proposal must cover (non-finite rows are
            ignored).
        basis: orthonormal :math:`Q` ``[D, m]`` of the support when it is a subspace (e.g.
            ``model.latent.basis``), else ``None``.
        evaluations: budget of ``log_prob`` calls: quadrature uses the largest odd number of nodes
            per axis within it, importance sampling as many draws. ``None``: 2001 nodes in 1-D,
            201 × 201 in 2-D, 4000 draws above.
        method: ``"quadrature"`` (1 or 2 dimensions), ``"importance"``, or ``"auto"``
            (quadrature when :math:`m \le 2`).
        margin: the quadrature box extends this many standard deviations beyond the data's range
            on each axis; the data's range is the core of the truncation error
            (:func:`quadrature_mass`).
        scales, weights: covariance inflations and weights of the proposal's components
            (:meth:`GaussianMixtureProposal.fit`).
        extra: further points the proposal must cover (e.g. the data's marginal for a
            conditional model whose proposal is fitted to draws at one condition): a Gaussian
            fitted to them (covariance ×``scales[0]``) joins the mixture with weight
            ``extra_fraction``. Quadrature ignores it.
        batch_size: points per ``log_prob`` call.
        seed: seeds the importance draws (a private generator; global RNG state is untouched).
    """
    event_shape = tuple(data.shape[1:])
    dtype, device = data.dtype, data.device
    q = None if basis is None else basis.detach().to("cpu", F64)
    y = _coordinates(data, q)
    if y.shape[0] == 0:
        raise ValueError("density_mass needs at least one finite data point")
    m = y.shape[1]

    def log_density(rows: Tensor) -> Tensor:
        x = rows if q is None else rows @ q.T
        return log_prob(x.to(device=device, dtype=dtype).reshape(rows.shape[0], *event_shape))

    if method == "auto":
        method = "quadrature" if m <= 2 else "importance"
    if method == "quadrature":
        if m > 2:
            raise ValueError(f"quadrature is for 1 or 2 dimensions, the support has {m}")
        if evaluations is None:
            nodes = DEFAULT_NODES[m]
        else:
            nodes = int(math.floor(evaluations ** (1.0 / m) + 1e-9))
            nodes = max(3, nodes if nodes % 2 else nodes - 1)
        std = y.std(dim=0) if y.shape[0] > 1 else torch.ones(m, dtype=F64)
        std = torch.where(std > 0, std, torch.ones_like(std))
        low, high = y.min(dim=0).values, y.max(dim=0).values
        lo, hi = (low - margin * std).tolist(), (high + margin * std).tolist()
        return quadrature_mass(log_density, lo, hi, nodes, (low.tolist(), high.tolist()), batch_size)
    if method != "importance":
        raise ValueError(f"unknown method {method!r}; choose 'auto', 'quadrature' or 'importance'")
    proposal = GaussianMixtureProposal.fit(y, scales, weights)
    if extra is not None:
        y_extra = _coordinates(extra, q)
        if y_extra.shape[0] > 0 and extra_fraction > 0:
            wide = GaussianMixtureProposal.fit(y_extra, scales[:1], (1.0,))
            proposal = proposal.mixed_with(wide, extra_fraction)
    generator = torch.Generator().manual_seed(seed)
    n = DEFAULT_DRAWS if evaluations is None else int(evaluations)
    return importance_mass(log_density, proposal, n, generator, batch_size)
