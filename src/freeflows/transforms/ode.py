r"""The ODE transform: the flow map of :math:`\dot x = f(t, x, c)` and its log-determinant.

**Dynamics and signs.** A velocity field :math:`f(t, x, c)` defines trajectories
:math:`\dot x = f(t, x, c)`. Following the library's direction convention, *forward* carries the
data :math:`x = x(0)` to the latent :math:`z = x(t_1)`. Along a trajectory the log-volume obeys

.. math:: \frac{d}{dt} \ell(t) = \operatorname{tr} \frac{\partial f}{\partial x}(t, x(t)),
   \qquad \ell(0) = 0,

and :math:`\ell(t_1) = \log\lvert\det \partial z / \partial x\rvert`, so that a density on the
latent gives :math:`\log p(x) = \log p_Z(z) + \ell(t_1)`. *Inverse* integrates :math:`\dot x = f`
backwards from :math:`t_1` to :math:`0`. All solves use ``torchdiffeq`` (``odeint``, or
``odeint_adjoint`` with ``adjoint=True``), imported when a solve starts, so values are exact up to
the solver tolerances ``rtol`` and ``atol``.

**Trace.** ``"exact"``: the per-row Jacobian :math:`J = \partial_x f \in \mathbb R^{D\times D}` from
:func:`freeflows.jacobian.batch_jacobian` (:math:`D` reverse products per evaluation, batched), for
small :math:`D`. ``"hutchinson"``: a probe :math:`v` with :math:`\mathbb E[vv^\top] = I` is drawn
**once per solve** and held fixed in time (as in FFJORD), and :math:`v^\top J v` is computed from
one vector-Jacobian product :math:`e = v^\top J`. Then :math:`\int v^\top J v\,dt` is an unbiased
estimate of :math:`\ell(t_1)`.

**States on a subspace.** With an orthonormal ``basis`` :math:`Q \in \mathbb R^{D\times m}` (for
example the zero-centre-of-mass configurations of
:class:`~freeflows.distributions.MeanFreeNormal`), the field must keep trajectories in that
subspace, and the log-volume is the subspace's: the trace is :math:`\operatorname{tr}(Q^\top J Q) =
\operatorname{tr}(J QQ^\top)`, and Hutchinson probes are :math:`v = Qu`, :math:`u \in \mathbb R^m`,
so that :math:`\mathbb E[v^\top J v] = \operatorname{tr}(Q^\top J Q)` too.

**RNODE regularisers** (Finlay et al., 2020), integrated as two more state components:

.. math:: \mathcal K = \int_0^{t_1} \lVert f(t, x(t)) \rVert^2 dt, \qquad
   \mathcal J = \int_0^{t_1} \lVert \partial_x f(t, x(t)) \rVert_F^2 dt .

The exact trace gives :math:`\lVert Q^\top J\rVert_F^2` (:math:`\lVert J \rVert_F^2` without a
basis) from the Jacobian it already has; the Hutchinson trace gives :math:`\lVert e \rVert^2 =
\lVert v^\top J \rVert^2`, whose expectation is the same, with no extra pass. Both are integrated
in every density solve but are **excluded from the solver's error control**, so they do not
change the steps taken.

**NFE.** Every call of the dynamics during a solve is counted in an :class:`NFECounter`:
``forward`` counts the density direction and the forward map, ``sample`` the inverse map, and
``backward`` the evaluations that a backward pass differentiates through (in adjoint mode those
of the adjoint solve; with direct backprop, those of the forward solve whose outputs receive a
gradient).

**Failures.** An adaptive solve that gives up (step size underflow, or more than
``max_num_steps`` steps: a stiff or non-finite field) raises
:class:`~freeflows.contract.NumericalError` naming the solver and tolerances.

References:
    Chen, Rubanova, Bettencourt and Duvenaud, "Neural Ordinary Differential Equations" (2018),
    arXiv:1806.07366.

    Grathwohl, Chen, Bettencourt, Sutskever and Duvenaud, "FFJORD: Free-form Continuous Dynamics
    for Scalable Reversible Generative Models" (2018), arXiv:1810.01367.

    Finlay, Jacobsen, Nurbekyan and Oberman, "How to train your neural ODE: the world of Jacobian
    and kinetic regularization" (2020), arXiv:2002.02798.

    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", Communications in Statistics - Simulation and Computation 18(3) (1989).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from ..conditioning import accepts_condition
from ..contract import NumericalError
from ..hutchinson import HUTCHINSON_MODES, HutchinsonMode, hutchinson_vectors
from ..jacobian import value_and_jacobian
from .base import Transform

TraceMode = Literal["exact", "hutchinson"]
Direction = Literal["density", "transform", "sample"]
TRACE_MODES: tuple[str, ...] = ("exact", "hutchinson")
ADAPTIVE_SOLVERS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_SOLVERS: tuple[str, ...] = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams")
#: How torchdiffeq's adaptive solvers report a failed solve (``AssertionError`` messages).
SOLVER_FAILURES: tuple[str, ...] = ("underflow in dt", "max_num_steps exceeded")
LOG_TWO_PI = math.log(2 * math.pi)


class NFECounter:
    """Running counts of function evaluations, by direction (see the module docstring):
    ``forward`` (density and forward map), ``backward`` (differentiated by backward passes) and
    ``sample`` (inverse map).

    Example:
        >>> from freeflows.transforms.ode import NFECounter
        >>> counter = NFECounter()
        >>> counter.forward += 6
        >>> counter.forward, counter.backward, counter.sample
        (6, 0, 0)
        >>> counter.reset()
        >>> counter.forward
        0
    """

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0
        self.sample = 0

    def reset(self) -> None:
        """Zero all three counts."""
        self.forward = self.backward = self.sample = 0

    def count_backward(self, grad: Tensor) -> None:
        """A tensor hook: count one evaluation each time a gradient flows into a velocity output.

        Args:
            grad: the gradient (unchanged).
        """
        self.backward += 1


def check_trace(trace: str) -> None:
    """Raise :class:`ValueError` unless ``trace`` is ``"exact"`` or ``"hutchinson"``.

    Args:
        trace: the trace estimator's name.

    Example:
        >>> from freeflows.transforms.ode import check_trace
        >>> check_trace("exact")
        >>> check_trace("exakt")
        Traceback (most recent call last):
            ...
        ValueError: unknown trace 'exakt'; choose one of exact, hutchinson
    """
    if trace not in TRACE_MODES:
        raise ValueError(f"unknown trace {trace!r}; choose one of {', '.join(TRACE_MODES)}")


def check_solver(
    solver: str,
    *,
    rtol: float | None = 1e-5,
    atol: float | None = 1e-5,
    step_size: float | None = None,
    max_num_steps: int | None = None,
    t1: float = 1.0,
    extra_tolerances: dict[str, float | None] | None = None,
) -> None:
    """Raise one :class:`ValueError` for an unknown solver or a setting it cannot use.

    Args:
        solver: a torchdiffeq method name (see :data:`ADAPTIVE_SOLVERS`, :data:`FIXED_SOLVERS`).
        rtol, atol: tolerances of adaptive solvers, ``> 0``.
        step_size: step of fixed-step solvers, ``> 0``.
        max_num_steps: most steps an adaptive solve may take, a positive integer or ``None``.
        t1: end time, ``> 0``.
        extra_tolerances: more named tolerances to check (``None`` values are allowed).

    Example:
        >>> from freeflows.transforms.ode import check_solver
        >>> check_solver("rk4", step_size=0.1)
        >>> check_solver("rk4")
        Traceback (most recent call last):
            ...
        ValueError: solver 'rk4' takes fixed steps: pass step_size > 0, got None
    """
    if max_num_steps is not None and (
        isinstance(max_num_steps, bool) or not isinstance(max_num_steps, int) or max_num_steps < 1
    ):
        raise ValueError(f"max_num_steps must be a positive integer or None, got {max_num_steps!r}")
    if solver in FIXED_SOLVERS:
        if step_size is None or not step_size > 0:
            raise ValueError(f"solver {solver!r} takes fixed steps: pass step_size > 0, got {step_size}")
    elif solver in ADAPTIVE_SOLVERS:
        named = {"rtol": rtol, "atol": atol, **(extra_tolerances or {})}
        for name, tol in named.items():
            if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
                raise ValueError(f"{name} must be a number > 0, got {tol!r}")
        if rtol is None or atol is None:
            raise ValueError(f"rtol and atol must be > 0, got {rtol!r} and {atol!r}")
    else:
        raise ValueError(
            f"unknown solver {solver!r}; choose one of {', '.join(ADAPTIVE_SOLVERS + FIXED_SOLVERS)}"
        )
    if isinstance(t1, bool) or not isinstance(t1, (int, float)) or not t1 > 0:
        raise ValueError(f"t1 must be a number > 0, got {t1!r}")


def exact_trace(
    field: Callable[..., Tensor],
    x: Tensor,
    c: Tensor | None = None,
    *,
    projector: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The field, the exact trace of its Jacobian and its squared Frobenius norm, per row.

    With a projector :math:`P = QQ^\top` onto a subspace, the trace is :math:`\operatorname{tr}(JP)
    = \operatorname{tr}(Q^\top J Q)` and the norm :math:`\operatorname{tr}(J^\top P J) = \lVert
    Q^\top J \rVert_F^2`. The Jacobian comes from :func:`freeflows.jacobian.value_and_jacobian`
    (reverse mode).

    Args:
        field: a batched function of flat rows, ``field(x)`` or ``field(x, c)``, ``[B, D] -> [B, D]``.
        x: flat states ``[B, D]``.
        c: conditions ``[B, C]``, or ``None``.
        projector: :math:`QQ^\top`, ``[D, D]``, or ``None``.
        chunk_size: rows per ``vmap`` call, or ``None`` for all at once.

    Returns:
        ``(f, trace, frobenius)``, ``[B, D]``, ``[B]`` and ``[B]``.

    Example:
        >>> import torch
        >>> from freeflows.transforms.ode import exact_trace
        >>> a = torch.tensor([[1.0, 2.0], [0.0, -3.0]])
        >>> f, trace, frobenius = exact_trace(lambda x: x @ a.T, torch.randn(4, 2))
        >>> trace.tolist(), frobenius.tolist()
        ([-2.0, -2.0, -2.0, -2.0], [14.0, 14.0, 14.0, 14.0])
    """
    f, jac = value_and_jacobian(field, x, c, mode="reverse", chunk_size=chunk_size)
    if projector is None:
        trace = jac.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
        frobenius = jac.square().sum(dim=(-2, -1))
    else:
        p = projector
        trace = (jac * p).sum(dim=(-2, -1))  # tr(J P) = tr(Qᵀ J Q), P = QQᵀ symmetric
        frobenius = (jac * (p @ jac)).sum(dim=(-2, -1))  # tr(Jᵀ P J) = ‖Qᵀ J‖²_F
    return f, trace, frobenius


def hutchinson_trace(
    field: Callable[..., Tensor], x: Tensor, probe: Tensor, c: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The field and one-probe Hutchinson estimates of the trace of its Jacobian and of its
    squared Frobenius norm, per row: :math:`e = v^\top J` from one vector-Jacobian product, then
    :math:`v^\top J v = e \cdot v` and :math:`\lVert e\rVert^2`. Both are unbiased when
    :math:`\mathbb E[vv^\top] = I` (or :math:`QQ^\top` on a subspace). The results keep their
    graph only when autograd is on.

    Args:
        field: a batched function of flat rows, ``field(x)`` or ``field(x, c)``, ``[B, D] -> [B, D]``.
        x: flat states ``[B, D]``.
        probe: :math:`v`, ``[B, D]`` (see :func:`freeflows.hutchinson.hutchinson_vectors`).
        c: conditions ``[B, C]``, or ``None``.

    Returns:
        ``(f, trace, frobenius)``, ``[B, D]``, ``[B]`` and ``[B]``.

    Example:
        >>> import torch
        >>> from freeflows.transforms.ode import hutchinson_trace
        >>> a = torch.tensor([[1.0, 2.0], [0.0, -3.0]])
        >>> f, trace, frobenius = hutchinson_trace(lambda x: x @ a.T, torch.randn(1, 2),
        ...                                        torch.tensor([[1.0, 1.0]]))
        >>> trace.tolist(), frobenius.tolist()  # vᵀAv = 1 + 2 - 3, ‖vᵀA‖² = 1 + 1
        ([0.0], [2.0])
    """
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        f = field(x) if c is None else field(x, c)
        e = None
        if f.requires_grad:
            (e,) = torch.autograd.grad(f, x, probe, create_graph=keep_graph, allow_unused=True)
        if e is None:  # the field does not depend on x
            e = torch.zeros_like(x)
    trace = (e * probe).sum(dim=-1)  # vᵀ J v
    frobenius = e.square().sum(dim=-1)  # ‖vᵀ J‖², E = ‖Qᵀ J‖²_F
    if not keep_graph:
        f, trace, frobenius = f.detach(), trace.detach(), frobenius.detach()
    return f, trace, frobenius


class Dynamics(nn.Module):
    r"""The right-hand side of one solve, with its settings frozen (so that an adjoint backward
    pass, which calls it again later, sees the same condition, probe and trace mode).

    ``direction="density"``: state :math:`(x, \ell, \mathcal K, \mathcal J)`, derivative
    :math:`(f, \operatorname{tr} J, \lVert f\rVert^2, \lVert J\rVert_F^2)`.
    ``direction="transform"`` or ``"sample"``: state :math:`x`, derivative :math:`f` (the first
    counts as the forward direction).
    States are flat, ``[B, D']``; the velocity sees ``state_shape``.

    Args:
        velocity: the field, ``velocity(t, x)`` or ``velocity(t, x, c)``.
        state_shape: the shape the velocity sees for one row.
        takes_c: whether the velocity takes a condition.
        counter: the :class:`NFECounter` to count evaluations in.
        direction: ``"density"``, ``"transform"`` or ``"sample"``.
        trace: ``"exact"`` or ``"hutchinson"`` (density direction only).
        condition: conditions ``[B, C]``, or ``None``.
        probe: the Hutchinson probe ``[B, D']``, held fixed during the solve.
        projector: :math:`QQ^\top` of a latent on a subspace, for the exact trace, or ``None``.
        chunk_size: rows per ``vmap`` call of the exact trace, or ``None``.

    Example:
        >>> import torch
        >>> from freeflows.transforms.ode import Dynamics, NFECounter
        >>> velocity = lambda t, x: -x  # contracts volume: tr J = -D
        >>> rhs = Dynamics(velocity, (3,), False, NFECounter(), "density")
        >>> x = torch.randn(4, 3)
        >>> f, trace, kinetic, frobenius = rhs(torch.tensor(0.0), (x, *torch.zeros(3, 4)))
        >>> torch.equal(f, -x), trace.tolist(), frobenius.tolist()
        (True, [-3.0, -3.0, -3.0, -3.0], [3.0, 3.0, 3.0, 3.0])
    """

    def __init__(
        self,
        velocity: nn.Module,
        state_shape: tuple[int, ...],
        takes_c: bool,
        counter: NFECounter,
        direction: Direction,
        trace: TraceMode = "exact",
        condition: Tensor | None = None,
        probe: Tensor | None = None,
        projector: Tensor | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.velocity = velocity
        self.chunk_size = chunk_size
        self.state_shape = state_shape
        self.takes_c = takes_c
        self.counter = counter
        self.direction = direction
        self.trace = trace
        self.condition = condition
        self.probe = probe
        self.projector = projector
        self.active = False  # True while the owner's own solve runs; adjoint calls come later

    def field(self, t: Tensor, x: Tensor, c: Tensor | None) -> Tensor:
        """The velocity :math:`f(t, x, c)` on flat rows.

        Args:
            t: the time, a 0-dim tensor.
            x: flat states ``[B, D']``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``[B, D']``.
        """
        inp = x.reshape(x.shape[0], *self.state_shape)
        out = self.velocity(t, inp) if c is None else self.velocity(t, inp, c)
        if out.shape != inp.shape:
            raise ValueError(
                f"the velocity net maps {tuple(inp.shape)} to {tuple(out.shape)}; it must keep the shape"
            )
        return out.reshape(x.shape)

    def forward(self, t: Tensor, state: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        r"""The time derivative of the state, as ``torchdiffeq`` calls it.

        Args:
            t: the time, a 0-dim tensor.
            state: :math:`(x, \ell, \mathcal K, \mathcal J)` in the density direction, else
                :math:`x`; ``x`` is ``[B, D']`` and the others ``[B]``.

        Returns:
            :math:`(f, \operatorname{tr} J, \lVert f\rVert^2, \lVert J\rVert_F^2)` in the density
            direction (the trace and norm estimated with the probe in the Hutchinson mode), else
            :math:`f`.
        """
        if self.active:
            if self.direction == "sample":
                self.counter.sample += 1
            else:
                self.counter.forward += 1
        c = self.condition
        if self.direction != "density":
            return self._hooked(self.field(t, state, c))

        def field(x: Tensor, c: Tensor | None = None) -> Tensor:
            return self.field(t, x, c)

        if self.trace == "exact":
            f, trace, frobenius = exact_trace(
                field, state[0], c, projector=self.projector, chunk_size=self.chunk_size
            )
        else:
            f, trace, frobenius = hutchinson_trace(field, state[0], self.probe, c)
        return self._hooked(f), trace, f.square().sum(dim=-1), frobenius

    def _hooked(self, f: Tensor) -> Tensor:
        if f.requires_grad:
            f.register_hook(self.counter.count_backward)
        return f


def _rms(x: Tensor) -> Tensor:
    return x.square().mean().sqrt()


def _density_norm(state: tuple[Tensor, ...]) -> Tensor:
    """Error norm of the density solve: the state and the log-volume only, not the regularisers."""
    return torch.maximum(_rms(state[0]), _rms(state[1]))


def normal_log_prob(a: Tensor) -> Tensor:
    r""":math:`\log \mathcal N(a; 0, I_k)` per row, the density of augmented coordinates.

    Args:
        a: ``[B, k]``.

    Returns:
        ``[B]``.

    Example:
        >>> import math, torch
        >>> from freeflows.transforms.ode import normal_log_prob
        >>> bool(torch.isclose(normal_log_prob(torch.zeros(1, 2)), torch.tensor(-math.log(2 * math.pi))))
        True
    """
    return -0.5 * a.square().sum(dim=-1) - 0.5 * a.shape[-1] * LOG_TWO_PI


def augment(h: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    r"""Append :math:`k` standard normal coordinates :math:`a \sim \mathcal N(0, I_k)` to flat
    rows, the augmented state of augmented neural ODEs (Dupont et al., 2019, arXiv:1904.01681).

    Args:
        h: flat rows ``[B, D]``.
        k: augmented dimensions, ``>= 0``.
        generator: random number generator for the draw.

    Returns:
        ``([h, a], a)``, ``[B, D + k]`` and ``[B, k]``.

    Example:
        >>> import torch
        >>> from freeflows.transforms.ode import augment
        >>> h, a = augment(torch.zeros(4, 3), 2)
        >>> h.shape, a.shape, torch.equal(h[:, 3:], a)
        (torch.Size([4, 5]), torch.Size([4, 2]), True)
    """
    if not k:
        return h, h.new_zeros(h.shape[0], 0)
    a = torch.randn(h.shape[0], k, generator=generator, dtype=h.dtype, device=h.device)
    return torch.cat([h, a], dim=1), a


def augmented_basis(basis: Tensor | None, d: int, k: int) -> tuple[Tensor | None, int]:
    r"""The basis :math:`\mathrm{blockdiag}(Q, I_k)` of a state of :math:`d` coordinates on a
    subspace with basis :math:`Q` plus :math:`k` free augmented coordinates, and its number of
    columns; ``(None, d + k)`` without a basis.

    Args:
        basis: :math:`Q`, ``[d, m]`` with orthonormal columns, or ``None``.
        d: coordinates of the data part.
        k: augmented coordinates.

    Returns:
        ``(basis or None, columns)``.

    Example:
        >>> import torch
        >>> from freeflows.transforms.ode import augmented_basis
        >>> q, m = augmented_basis(torch.tensor([[1.0], [0.0]]), 2, 1)
        >>> q.tolist(), m
        ([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], 2)
    """
    if basis is None:
        return None, d + k
    m = basis.shape[1]
    full = basis.new_zeros(d + k, m + k)
    full[:d, :m] = basis
    if k:
        full[d:, m:] = torch.eye(k, dtype=basis.dtype, device=basis.device)
    return full, m + k


class ODETransform(Transform):
    r"""The flow map of :math:`\dot x = f(t, x, c)` from :math:`t = 0` (data) to :math:`t_1`
    (latent), an exact bijection up to the solver tolerances (see the module docstring).

    ``forward(x, c)`` returns :math:`z = x(t_1)` and :math:`\log\lvert\det \partial z/\partial
    x\rvert = \int_0^{t_1} \operatorname{tr} \partial_x f\, dt` (with the configured trace: exact,
    or a Hutchinson estimate); ``inverse(z, c)`` integrates back to :math:`t = 0`.
    :meth:`solve_density` and :meth:`solve` are the flat-state solves that a model such as
    :class:`~freeflows.continuous.CNF` builds on.

    Args:
        velocity: network ``f(t, x)`` or ``f(t, x, c)`` (a ``forward`` with a parameter named
            ``c``) keeping the shape ``[B, *event_shape]``; ``t`` is a 0-dim tensor.
        event_shape: the shape of one row the velocity sees.
        trace: ``"exact"`` or ``"hutchinson"``.
        hutchinson: probe distribution, ``"gaussian"``, ``"rademacher"`` or ``"sphere"``.
        basis: orthonormal :math:`Q`, ``[D, m]``, of the subspace the states live on, or ``None``.
        solver: a torchdiffeq method: adaptive ``dopri5`` (default), ``dopri8``, ``bosh3``,
            ``fehlberg2``, ``adaptive_heun``, or fixed-step ``rk4``, ``euler``, ``midpoint``,
            ``heun2``, ``heun3``, ``explicit_adams`` (these need ``step_size``).
        rtol, atol: tolerances of adaptive solvers.
        step_size: step of fixed-step solvers.
        adjoint: backpropagate with the adjoint method (memory O(1) in the number of steps).
        t1: end time :math:`t_1 > 0`.
        chunk_size: rows per ``vmap`` call of the exact trace; ``None`` does all rows at once.
        max_num_steps: most steps an adaptive solve may take; ``None`` is unlimited.
        counter: the :class:`NFECounter` to count in; a new one by default.

    References:
        Chen, Rubanova, Bettencourt and Duvenaud, "Neural Ordinary Differential Equations"
        (2018), arXiv:1806.07366.
        Grathwohl, Chen, Bettencourt, Sutskever and Duvenaud, "FFJORD: Free-form Continuous
        Dynamics for Scalable Reversible Generative Models" (2018), arXiv:1810.01367.

    Example:
        >>> import math, torch
        >>> from torch import nn
        >>> from freeflows.transforms import ODETransform
        >>> class Linear(nn.Module):
        ...     def forward(self, t, x):
        ...         return 0.5 * x  # z = exp(0.5) x, log|det| = 0.5 D
        >>> t = ODETransform(Linear(), (3,), rtol=1e-7, atol=1e-7)
        >>> x = torch.randn(4, 3)
        >>> z, log_det = t(x)
        >>> torch.allclose(z, x * math.exp(0.5), atol=1e-5), torch.allclose(log_det, torch.full((4,), 1.5))
        (True, True)
        >>> torch.allclose(t.inverse(z), x, atol=1e-5)
        True
    """

    def __init__(
        self,
        velocity: nn.Module,
        event_shape: tuple[int, ...],
        *,
        trace: TraceMode = "exact",
        hutchinson: HutchinsonMode = "gaussian",
        basis: Tensor | None = None,
        solver: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        step_size: float | None = None,
        adjoint: bool = False,
        t1: float = 1.0,
        chunk_size: int | None = None,
        max_num_steps: int | None = 10_000,
        counter: NFECounter | None = None,
    ) -> None:
        super().__init__()
        check_trace(trace)
        if hutchinson not in HUTCHINSON_MODES:
            choices = ", ".join(HUTCHINSON_MODES)
            raise ValueError(f"unknown Hutchinson mode {hutchinson!r}; choose one of {choices}")
        check_solver(solver, rtol=rtol, atol=atol, step_size=step_size, max_num_steps=max_num_steps, t1=t1)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.velocity = velocity
        self.event_shape = tuple(event_shape)
        self.trace: TraceMode = trace
        self.hutchinson: HutchinsonMode = hutchinson
        self.basis = basis
        self.solver = solver
        self.rtol, self.atol = float(rtol), float(atol)
        self.step_size = None if step_size is None else float(step_size)
        self.adjoint = bool(adjoint)
        self.t1 = float(t1)
        self.chunk_size = chunk_size
        self.max_num_steps = max_num_steps
        self.counter = NFECounter() if counter is None else counter
        self.takes_c = accepts_condition(velocity) if isinstance(velocity, nn.Module) else False

    def dynamics(self, direction: Direction, **settings: object) -> Dynamics:
        """The right-hand side for one solve in ``direction``.

        Args:
            direction: ``"density"``, ``"transform"`` or ``"sample"``.
            settings: keywords of :class:`Dynamics` (``trace``, ``condition``, ``probe``, ...).

        Returns:
            :class:`Dynamics`.

        Example:
            >>> import torch
            >>> from freeflows.transforms.ode import ODETransform
            >>> t = ODETransform(lambda t, x: -x, (2,))
            >>> t.dynamics("sample")(torch.tensor(0.0), torch.ones(1, 2))
            tensor([[-1., -1.]])
        """
        return Dynamics(self.velocity, self.event_shape, self.takes_c, self.counter, direction, **settings)

    def solve(
        self,
        dynamics: Dynamics,
        y0: Tensor | tuple[Tensor, ...],
        t0: float,
        t1: float,
        tolerances: tuple[float, float] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """Integrate ``dynamics`` from ``t0`` to ``t1`` and return the end state; a failed
        adaptive solve raises :class:`~freeflows.contract.NumericalError`.

        Args:
            dynamics: the right-hand side (:meth:`dynamics`).
            y0: the start state, a tensor or a tuple of tensors (the density direction).
            t0: start time.
            t1: end time.
            tolerances: ``(rtol, atol)`` instead of the transform's.

        Returns:
            The state at ``t1``, shaped like ``y0``.

        Example:
            >>> import torch
            >>> from freeflows.transforms.ode import ODETransform
            >>> t = ODETransform(lambda t, x: -x, (2,), solver="euler", step_size=0.5)
            >>> t.solve(t.dynamics("transform"), torch.ones(1, 2), 0.0, 1.0)  # (1 - 0.5)²
            tensor([[0.2500, 0.2500]])
        """
        from torchdiffeq import odeint, odeint_adjoint

        first = y0 if isinstance(y0, Tensor) else y0[0]
        t = torch.tensor([t0, t1], dtype=first.dtype, device=first.device)
        options: dict = {}
        if self.solver in FIXED_SOLVERS:
            options["step_size"] = self.step_size
        else:
            if not isinstance(y0, Tensor):
                options["norm"] = _density_norm
            if self.max_num_steps is not None:
                options["max_num_steps"] = self.max_num_steps
            # Land the last step on the end time instead of stepping past it and interpolating:
            # a trial step far beyond t1 evaluates the field at times it was never trained on,
            # where it can overflow; torchdiffeq then gets a NaN error ratio and gives up.
            options["step_t"] = t[-1:]
        rtol, atol = (self.rtol, self.atol) if tolerances is None else tolerances
        kwargs = {"rtol": rtol, "atol": atol, "method": self.solver, "options": options}
        dynamics.active = True
        try:
            if self.adjoint:
                params = [p for p in self.velocity.parameters() if p.requires_grad]
                c = dynamics.condition
                if c is not None and c.requires_grad:
                    params.append(c)
                out = odeint_adjoint(dynamics, y0, t, adjoint_params=tuple(params), **kwargs)
            else:
                out = odeint(dynamics, y0, t, **kwargs)
        except AssertionError as err:  # torchdiffeq's adaptive step control gives up by assertion
            if not str(err).startswith(SOLVER_FAILURES):
                raise
            raise NumericalError(
                f"the ODE solve from t={t0:g} to t={t1:g} failed ({err}; {self.solver}, rtol={rtol:g}, "
                f"atol={atol:g}): the velocity field is stiff or non-finite there"
            ) from None
        finally:
            dynamics.active = False
        return out[-1] if isinstance(out, Tensor) else tuple(s[-1] for s in out)

    def solve_density(
        self,
        h: Tensor,
        c: Tensor | None = None,
        *,
        reverse: bool = False,
        trace: TraceMode | None = None,
        generator: torch.Generator | None = None,
        tolerances: tuple[float, float] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""Solve the state with its log-volume and the RNODE integrals, on flat rows: from
        :math:`(h, 0, 0, 0)` at :math:`t = 0` to :math:`t_1` (or, with ``reverse``, from
        :math:`t_1` to 0, which gives minus the integrals).

        Args:
            h: flat states ``[B, D]``.
            c: conditions ``[B, C]``, or ``None``.
            reverse: integrate from :math:`t_1` back to 0.
            trace: ``"exact"`` or ``"hutchinson"``; ``None`` for the transform's.
            generator: random number generator for the Hutchinson probe (one per row and solve).
            tolerances: ``(rtol, atol)`` instead of the transform's.

        Returns:
            ``(h_end, ell, kinetic, jacobian)``: ``[B, D]`` and three ``[B]``.

        Example:
            >>> import torch
            >>> from freeflows.transforms.ode import ODETransform
            >>> t = ODETransform(lambda t, x: -x, (2,), rtol=1e-7, atol=1e-7)
            >>> z, ell, kinetic, jacobian = t.solve_density(torch.ones(1, 2))
            >>> round(float(ell), 4), round(float(jacobian), 4)  # ∫ tr J = -2, ∫ ‖J‖²_F = 2
            (-2.0, 2.0)
        """
        trace = self.trace if trace is None else trace
        check_trace(trace)
        basis = None if self.basis is None else self.basis.to(h)
        settings: dict = {"trace": trace, "condition": c, "chunk_size": self.chunk_size}
        if trace == "exact":
            settings["projector"] = None if basis is None else basis @ basis.T
        else:
            m = h.shape[1] if basis is None else basis.shape[1]
            probe = hutchinson_vectors(
                1, h.shape[0], m, self.hutchinson, basis=basis, device=h.device, dtype=h.dtype,
                generator=generator,
            )
            settings["probe"] = probe[0]
        zeros = h.new_zeros(h.shape[0])
        t0, t1 = (self.t1, 0.0) if reverse else (0.0, self.t1)
        out = self.solve(self.dynamics("density", **settings), (h, zeros, zeros, zeros), t0, t1, tolerances)
        return out  # type: ignore[return-value]

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Map data to latent: :math:`z = x(t_1)` and :math:`\int_0^{t_1} \operatorname{tr}
        \partial_x f\, dt` (exact, or a Hutchinson estimate with ``trace="hutchinson"``).

        Args:
            x: data ``[B, *event_shape]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``(z, log_det)``, ``[B, *event_shape]`` and ``[B]``.
        """
        z, ell, _, _ = self.solve_density(x.reshape(x.shape[0], -1), c)
        return z.reshape(x.shape), ell

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """Map latent to data: integrate from :math:`t_1` back to 0 (counted as ``sample``).

        Args:
            z: latent points ``[B, *event_shape]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``[B, *event_shape]``.
        """
        x = self.solve(self.dynamics("sample", condition=c), z.reshape(z.shape[0], -1), self.t1, 0.0)
        return x.reshape(z.shape)  # type: ignore[union-attr]


__all__ = [
    "ADAPTIVE_SOLVERS",
    "FIXED_SOLVERS",
    "SOLVER_FAILURES",
    "TRACE_MODES",
    "Dynamics",
    "NFECounter",
    "ODETransform",
    "augment",
    "augmented_basis",
    "check_solver",
    "check_trace",
    "exact_trace",
    "hutchinson_trace",
    "normal_log_prob",
]
