r"""Continuous normalizing flows (FFJORD), with RNODE regularisers and augmented dimensions.

**Dynamics and signs.** A velocity field :math:`f(t, x, c)` defines trajectories
:math:`\dot x = f(t, x, c)`. Following the library's direction convention, *forward* carries the
data :math:`x = x(0)` to the latent :math:`z = x(t_1)`. Along a trajectory the density obeys the
instantaneous change of variables

.. math:: \frac{d}{dt} \log p_t(x(t)) = -\operatorname{tr} \frac{\partial f}{\partial x}(t, x(t)),

so with :math:`\ell(t) = \int_0^t \operatorname{tr} \partial_x f(s, x(s))\, ds` integrated
alongside :math:`x` from :math:`\ell(0) = 0`,

.. math:: \log p(x) = \log p_Z(z) + \ell(t_1).

(A field that expands volume, :math:`\operatorname{tr}\partial_x f > 0`, maps a region of data to
a larger region of latent, so the data density is *higher* than the latent density there.)
Sampling integrates :math:`\dot x = f` backwards from :math:`t_1` to :math:`0`, from
:math:`z \sim p_Z`. All solves use ``torchdiffeq`` (``odeint``, or ``odeint_adjoint`` with
``adjoint=True``), so values are exact up to the solver tolerances ``rtol`` and ``atol``.

**Tolerances.** :meth:`CNF.log_prob`, :meth:`CNF.sample` and :meth:`CNF.transform` always solve
with ``rtol``/``atol``. :meth:`CNF.loss` (training) solves with ``train_rtol``/``train_atol``,
which default to the same values; looser training tolerances (e.g. ``1e-3``) halve the cost of a
training step on toy data while the reported densities keep the tight ones.

**Trace.** ``"exact"``: the per-row Jacobian :math:`J = \partial_x f \in \mathbb R^{D\times D}` with
``torch.func`` (``vmap`` of ``jacrev``, :math:`D` reverse products per evaluation, batched), for
small :math:`D`. ``"hutchinson"``: a probe :math:`v` with :math:`\mathbb E[vv^\top] = I` is drawn
**once per solve** and held fixed in time (as in FFJORD), and :math:`v^\top J v` is computed from
one vector-Jacobian product :math:`e = v^\top J`. Then :math:`\int v^\top J v\,dt` is an unbiased
estimate of :math:`\ell(t_1)`. :meth:`CNF.log_prob` uses the exact trace by default, whatever the
training trace is; :meth:`CNF.loss` uses the configured one.

**Latents on a subspace.** If ``latent.basis`` is an orthonormal :math:`Q \in \mathbb R^{D\times m}`
(e.g. :class:`~freeflows.distributions.MeanFreeNormal`), the field must keep trajectories in that
subspace (e.g. an equivariant, mean-free velocity), and the density is the one with respect to the
subspace's Lebesgue measure: the trace is :math:`\operatorname{tr}(Q^\top J Q) = \operatorname{tr}(J
QQ^\top)` and Hutchinson probes are :math:`v = Qu`, :math:`u \in \mathbb R^m`, so that
:math:`\mathbb E[v^\top J v] = \operatorname{tr}(Q^\top J Q)` too.

**RNODE regularisers** (Finlay et al., 2020), integrated as two more state components:

.. math:: \mathcal K = \int_0^{t_1} \lVert f(t, x(t)) \rVert^2 dt, \qquad
   \mathcal J = \int_0^{t_1} \lVert \partial_x f(t, x(t)) \rVert_F^2 dt .

The exact trace gives :math:`\lVert Q^\top J\rVert_F^2` (:math:`\lVert J \rVert_F^2` without a
basis) from the Jacobian it already has; the Hutchinson trace gives :math:`\lVert e \rVert^2 =
\lVert v^\top J \rVert^2`, whose expectation is the same, with no extra pass. Both are always
integrated (they are cheap and are logged) but are **excluded from the solver's error control**, so
they do not change the steps taken; they enter the loss only with the weights of
``regularization``.

**Augmented dimensions** (augmented neural ODEs, Dupont et al., 2019). With ``augment_dims = k``
the ODE runs on :math:`(x, a) \in \mathbb R^{D+k}` with latent :math:`p_Z(z_x)\,\mathcal N(z_a; 0,
I_k)`, which defines a joint density :math:`q(x, a)` at :math:`t = 0`; the model of the data is
its marginal :math:`q(x) = \int q(x, a)\,da`, and :meth:`CNF.sample` draws from it exactly (solve
backwards, drop :math:`a`). The marginal has no closed form, so with ``augment_dims > 0``
**log_prob is NOT exact: it is an importance-sampling estimate** with proposal
:math:`a \sim \mathcal N(0, I_k)`:

.. math:: \widehat{\log q}(x) = \log \frac1K \sum_{i=1}^K \frac{q(x, a_i)}{\mathcal N(a_i; 0, I_k)},

(:math:`K` = ``augment_samples``, default 1), a stochastic **lower bound** in expectation,
:math:`\mathbb E[\widehat{\log q}(x)] \le \log q(x)` (Jensen), that tightens as :math:`K` grows
and is tight when :math:`q(a \mid x) = \mathcal N(a; 0, I_k)`. Training minimises the negative
:math:`K = 1` bound.

**NFE.** Every call of the dynamics is counted. ``nfe_forward`` counts the density direction
(``log_prob`` and ``loss``), ``nfe_sample`` the sampling direction, and ``nfe_backward`` the
function evaluations that the training backward pass differentiates through: in adjoint mode these
are the evaluations of the backward (adjoint) solve; with direct backprop, the evaluations of the
forward solve whose outputs receive a gradient. ``reset_nfe()`` zeroes all three.

References:
    Chen, Rubanova, Bettencourt and Duvenaud, "Neural Ordinary Differential Equations" (2018),
    arXiv:1806.07366.

    Grathwohl, Chen, Bettencourt, Sutskever and Duvenaud, "FFJORD: Free-form Continuous Dynamics
    for Scalable Reversible Generative Models" (2018), arXiv:1810.01367.

    Finlay, Jacobsen, Nurbekyan and Oberman, "How to train your neural ODE: the world of Jacobian
    and kinetic regularization" (2020), arXiv:2002.02798.

    Dupont, Doucet and Teh, "Augmented Neural ODEs" (2019), arXiv:1904.01681.

    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", Communications in Statistics - Simulation and Computation 18(3) (1989).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from .checks import check_condition_dim, check_options, numel
from .conditioning import accepts_condition, resolve_condition_dim
from .contract import DensityModule, Loss, NumericalError
from .hutchinson import HUTCHINSON_MODES, HutchinsonMode, hutchinson_vectors
from .serialization import named_constructor

TraceMode = Literal["exact", "hutchinson"]
TRACE_MODES: tuple[str, ...] = ("exact", "hutchinson")
ADAPTIVE_SOLVERS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_SOLVERS: tuple[str, ...] = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams")
REGULARIZERS: tuple[str, ...] = ("kinetic", "jacobian")
#: How torchdiffeq's adaptive solvers report a failed solve (``AssertionError`` messages).
SOLVER_FAILURES: tuple[str, ...] = ("underflow in dt", "max_num_steps exceeded")
LOG_TWO_PI = math.log(2 * math.pi)
#: The options of the ODE, the trace and the regularisers, shared by every constructor of :class:`CNF`.
SOLVER_OPTIONS: tuple[str, ...] = (
    "trace",
    "hutchinson",
    "solver",
    "rtol",
    "atol",
    "train_rtol",
    "train_atol",
    "step_size",
    "adjoint",
    "regularization",
    "t1",
    "chunk_size",
    "max_num_steps",
)


class NFECounter:
    """Running counts of function evaluations, by direction (see the module docstring):
    ``forward`` (density), ``backward`` (differentiated by training backward passes) and
    ``sample``.

    Example:
        >>> from freeflows.continuous import NFECounter
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


def _rms(x: Tensor) -> Tensor:
    return x.square().mean().sqrt()


def _density_norm(state: tuple[Tensor, ...]) -> Tensor:
    """Error norm of the density solve: the state and the log-density only, not the regularisers."""
    return torch.maximum(_rms(state[0]), _rms(state[1]))


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
        >>> from freeflows.continuous import Dynamics, NFECounter
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
        direction: Literal["density", "transform", "sample"],
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
        self.active = False  # True while the CNF's own solve runs; adjoint calls come later

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
        if self.direction != "density":
            f = self.field(t, state, self.condition)
            return self._hooked(f)
        x = state[0]
        if self.trace == "exact":
            f, trace, frobenius = self._exact(t, x)
        else:
            f, trace, frobenius = self._hutchinson(t, x)
        return self._hooked(f), trace, f.square().sum(dim=-1), frobenius

    def _hooked(self, f: Tensor) -> Tensor:
        if f.requires_grad:
            f.register_hook(self.counter.count_backward)
        return f

    def _exact(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.condition

        def one(xi: Tensor, ci: Tensor | None) -> tuple[Tensor, Tensor]:
            out = self.field(t, xi.unsqueeze(0), None if ci is None else ci.unsqueeze(0)).squeeze(0)
            return out, out

        in_dims = (0, None if c is None else 0)
        jac, f = vmap(jacrev(one, has_aux=True), in_dims=in_dims, chunk_size=self.chunk_size)(x, c)
        if self.projector is None:
            trace = jac.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
            frobenius = jac.square().sum(dim=(-2, -1))
        else:
            p = self.projector
            trace = (jac * p).sum(dim=(-2, -1))  # tr(J P) = tr(Qᵀ J Q), P = QQᵀ symmetric
            frobenius = (jac * (p @ jac)).sum(dim=(-2, -1))  # tr(Jᵀ P J) = ‖Qᵀ J‖²_F
        return f, trace, frobenius

    def _hutchinson(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            f = self.field(t, x, self.condition)
            e = None
            if f.requires_grad:
                (e,) = torch.autograd.grad(f, x, self.probe, create_graph=keep_graph, allow_unused=True)
            if e is None:  # the field does not depend on x
                e = torch.zeros_like(x)
        trace = (e * self.probe).sum(dim=-1)  # vᵀ J v
        frobenius = e.square().sum(dim=-1)  # ‖vᵀ J‖², E = ‖Qᵀ J‖²_F
        if not keep_graph:
            f, trace, frobenius = f.detach(), trace.detach(), frobenius.detach()
        return f, trace, frobenius


class CNF(DensityModule):
    r"""A continuous normalizing flow :math:`\dot x = f(t, x, c)` from data (:math:`t=0`) to latent
    (:math:`t = t_1`). See the module docstring for the maths.

    ``CNF(features, condition_dim)`` builds the velocity field, a
    :class:`~freeflows.nets.velocity.TimeMLP` (``layers`` hidden layers of width ``hidden`` with
    ``activation``; time and condition feed every layer), on events of ``features`` numbers
    (an int, or an event shape, which is flattened) with a standard normal latent.
    :meth:`from_velocity` takes any velocity network and latent; :meth:`egnn` builds the
    equivariant CNF of particle systems. All take the options below as keywords.

    Args:
        features: ``D``, or an event shape.
        condition_dim: number of condition features, or ``None`` for an unconditional flow.
        hidden, layers, activation: the :class:`~freeflows.nets.velocity.TimeMLP`.
        augment_dims: number :math:`k \ge 0` of augmented dimensions. With ``k > 0``,
            ``log_prob`` is an **estimate** (a stochastic lower bound), not the exact density.
        trace: ``"exact"`` or ``"hutchinson"``, the trace used by :meth:`loss`.
        hutchinson: probe distribution, ``"gaussian"`` or ``"rademacher"`` (or ``"sphere"``).
        solver: a torchdiffeq method: adaptive ``dopri5`` (default), ``dopri8``, ``bosh3``,
            ``fehlberg2``, ``adaptive_heun``, or fixed-step ``rk4``, ``euler``, ``midpoint``,
            ``heun2``, ``heun3``, ``explicit_adams`` (these need ``step_size``).
        rtol, atol: tolerances of adaptive solvers for ``log_prob``, ``sample`` and ``transform``.
        train_rtol, train_atol: tolerances of the training solves of :meth:`loss`; ``None``
            (default) uses ``rtol`` and ``atol``.
        step_size: step of fixed-step solvers.
        adjoint: backpropagate with the adjoint method (``odeint_adjoint``, memory O(1) in the
            number of steps) instead of through the solver's operations.
        regularization: ``None`` or a dict with keys ``"kinetic"`` and/or ``"jacobian"`` giving
            the weights :math:`\lambda_K, \lambda_J \ge 0` of the RNODE terms in :meth:`loss`.
        t1: end time :math:`t_1 > 0`.
        chunk_size: rows per ``vmap`` call of the exact trace (bounds memory to
            ``chunk * D`` reverse products at once); ``None`` does all rows at once.
        max_num_steps: most steps an adaptive solve may take; ``None`` is unlimited.

    A solve that fails (adaptive step size underflow, or more than ``max_num_steps`` steps: a
    stiff or non-finite field) raises :class:`~freeflows.contract.NumericalError`.

    References:
        Chen, Rubanova, Bettencourt and Duvenaud, "Neural Ordinary Differential Equations"
        (2018), arXiv:1806.07366.
        Grathwohl, Chen, Bettencourt, Sutskever and Duvenaud, "FFJORD: Free-form Continuous
        Dynamics for Scalable Reversible Generative Models" (2018), arXiv:1810.01367.
        Finlay, Jacobsen, Nurbekyan and Oberman, "How to train your neural ODE: the world of
        Jacobian and kinetic regularization" (2020), arXiv:2002.02798.
        Dupont, Doucet and Teh, "Augmented Neural ODEs" (2019), arXiv:1904.01681.

    Example:
        >>> import torch, freeflows as ff
        >>> cnf = ff.CNF(2, condition_dim=1, hidden=16, layers=2, regularization={"kinetic": 0.01})
        >>> x, c = torch.randn(8, 2), torch.randn(8, 1)
        >>> loss = cnf.loss(x, c)
        >>> loss.value.backward()
        >>> sorted(loss.parts)
        ['jacobian', 'kinetic', 'nfe_backward', 'nfe_forward', 'nll']
        >>> cnf.sample(3, c[:2]).shape  # 3 draws for each of 2 conditions
        torch.Size([3, 2, 2])
    """

    _settings = SOLVER_OPTIONS

    @named_constructor
    def __init__(
        self,
        features: int | tuple[int, ...],
        condition_dim: int | None = None,
        *,
        hidden: int = 64,
        layers: int = 3,
        activation: str = "tanh",
        augment_dims: int = 0,
        trace: TraceMode = "exact",
        hutchinson: HutchinsonMode = "gaussian",
        solver: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        train_rtol: float | None = None,
        train_atol: float | None = None,
        step_size: float | None = None,
        adjoint: bool = False,
        regularization: dict[str, float] | None = None,
        t1: float = 1.0,
        chunk_size: int | None = None,
        max_num_steps: int | None = 10_000,
    ) -> None:
        from .distributions import StandardNormal
        from .nets.velocity import TimeMLP

        super().__init__()
        if isinstance(features, nn.Module):
            raise TypeError(
                "CNF(features, condition_dim, ...) builds its own velocity field; for your own "
                "velocity network use CNF.from_velocity(velocity, latent, ...)"
            )
        shape = (features,) if isinstance(features, int) and not isinstance(features, bool) else features
        if not isinstance(shape, (tuple, list)) or not shape or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
        ):
            raise ValueError(f"features must be a positive integer or an event shape, got {features!r}")
        check_condition_dim(condition_dim)
        if isinstance(augment_dims, bool) or not isinstance(augment_dims, int) or augment_dims < 0:
            raise ValueError(f"augment_dims must be an integer >= 0, got {augment_dims!r}")
        velocity = TimeMLP(
            numel(tuple(shape)) + augment_dims,
            hidden=hidden,
            layers=layers,
            condition_dim=condition_dim or 0,
            activation=activation,
        )
        self._setup(
            velocity,
            StandardNormal(*shape),
            condition_dim=condition_dim,
            augment_dims=augment_dims,
            trace=trace,
            hutchinson=hutchinson,
            solver=solver,
            rtol=rtol,
            atol=atol,
            train_rtol=train_rtol,
            train_atol=train_atol,
            step_size=step_size,
            adjoint=adjoint,
            regularization=regularization,
            t1=t1,
            chunk_size=chunk_size,
            max_num_steps=max_num_steps,
        )

    @classmethod
    def from_velocity(
        cls,
        velocity: nn.Module,
        latent: nn.Module,
        *,
        condition_dim: int | None = None,
        augment_dims: int = 0,
        **options: Any,
    ) -> CNF:
        r"""A CNF with any velocity network and latent.

        Args:
            velocity: network ``f(t, x)`` or ``f(t, x, c)`` (a ``forward`` with a parameter named
                ``c``) mapping ``x`` of shape ``[B, *event_shape]`` (``[B, D + augment_dims]``
                when augmented) to the same shape; ``t`` is a 0-dim tensor.
            latent: latent distribution with ``event_shape``, ``log_prob``, ``sample`` and
                ``basis``.
            condition_dim: number of condition features. A velocity that declares its own
                (``condition_dim``, as
                :class:`~freeflows.nets.velocity.TimeMLP` does) must declare the same, else
                construction fails; ``None`` takes the velocity's.
            augment_dims: augmented dimensions (see the class docstring).
            options: the ODE options of the class docstring (``trace``, ``solver``, ``rtol``, ...).

        Returns:
            The CNF. :func:`freeflows.save` refuses it (it cannot rebuild your network): save its
            ``state_dict``.

        Example:
            >>> import torch, freeflows as ff
            >>> from freeflows.nets import TimeMLP
            >>> cnf = ff.CNF.from_velocity(TimeMLP(3, hidden=16), ff.StandardNormal(3), solver="rk4",
            ...                            step_size=0.25)
            >>> cnf.sample(4).shape, cnf.nfe_sample  # 4 rk4 steps of 4 evaluations
            (torch.Size([4, 3]), 16)
        """
        check_options("CNF.from_velocity", options, SOLVER_OPTIONS)
        model = cls.__new__(cls)
        DensityModule.__init__(model)
        condition_dim = resolve_condition_dim(check_condition_dim(condition_dim), {"velocity": velocity})
        model._setup(velocity, latent, condition_dim=condition_dim, augment_dims=augment_dims, **options)
        return model

    @classmethod
    @named_constructor
    def egnn(
        cls,
        n_particles: int,
        n_dims: int,
        *,
        hidden: int = 32,
        layers: int = 3,
        attention: bool = True,
        **options: Any,
    ) -> CNF:
        r"""The equivariant CNF of ``n_particles`` points in ``n_dims`` dimensions (events of
        ``n_particles * n_dims`` numbers, particle-major): an
        :class:`~freeflows.nets.EGNNVelocity` field (``layers`` layers of width ``hidden``) and a
        :class:`~freeflows.distributions.MeanFreeNormal` latent; unconditional. Densities are
        with respect to the :math:`(N-1)d`-dimensional zero-centre-of-mass subspace.

        Args:
            n_particles: :math:`N \ge 2`.
            n_dims: :math:`d`.
            hidden: width of the EGNN.
            layers: EGNN layers.
            attention: gate the messages.
            options: the ODE options of the class docstring (``trace``, ``solver``, ``rtol``, ...).

        Returns:
            The CNF; :func:`freeflows.save` can store it.

        References:
            Satorras, Hoogeboom, Fuchs, Posner and Welling, "E(n) Equivariant Normalizing Flows"
            (2021), arXiv:2105.09016.

        Example:
            >>> import torch, freeflows as ff
            >>> cnf = ff.CNF.egnn(3, 2, hidden=8, layers=1)
            >>> x = cnf.sample(4)
            >>> x.shape, torch.allclose(x.reshape(4, 3, 2).mean(1), torch.zeros(4, 2), atol=1e-6)
            (torch.Size([4, 6]), True)
        """
        from .distributions import MeanFreeNormal
        from .nets.egnn import EGNNVelocity

        velocity = EGNNVelocity(n_particles, n_dims, hidden=hidden, layers=layers, attention=attention)
        return cls.from_velocity(velocity, MeanFreeNormal(n_particles, n_dims), **options)

    def _setup(
        self,
        velocity: nn.Module,
        latent: nn.Module,
        *,
        condition_dim: int | None = None,
        augment_dims: int = 0,
        trace: TraceMode = "exact",
        hutchinson: HutchinsonMode = "gaussian",
        solver: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        train_rtol: float | None = None,
        train_atol: float | None = None,
        step_size: float | None = None,
        adjoint: bool = False,
        regularization: dict[str, float] | None = None,
        t1: float = 1.0,
        chunk_size: int | None = None,
        max_num_steps: int | None = 10_000,
    ) -> None:
        _check_trace(trace)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if max_num_steps is not None and (not isinstance(max_num_steps, int) or max_num_steps < 1):
            raise ValueError(f"max_num_steps must be a positive integer or None, got {max_num_steps!r}")
        if hutchinson not in HUTCHINSON_MODES:
            choices = ", ".join(HUTCHINSON_MODES)
            raise ValueError(f"unknown Hutchinson mode {hutchinson!r}; choose one of {choices}")
        if solver in FIXED_SOLVERS:
            if step_size is None or not step_size > 0:
                raise ValueError(f"solver {solver!r} takes fixed steps: pass step_size > 0, got {step_size}")
        elif solver in ADAPTIVE_SOLVERS:
            for name, tol in (
                ("rtol", rtol),
                ("atol", atol),
                ("train_rtol", train_rtol),
                ("train_atol", train_atol),
            ):
                if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
                    raise ValueError(f"{name} must be a number > 0, got {tol!r}")
            if rtol is None or atol is None:
                raise ValueError(f"rtol and atol must be > 0, got {rtol!r} and {atol!r}")
        else:
            raise ValueError(
                f"unknown solver {solver!r}; choose one of {', '.join(ADAPTIVE_SOLVERS + FIXED_SOLVERS)}"
            )
        regularization = dict(regularization or {})
        unknown = sorted(set(regularization) - set(REGULARIZERS))
        if unknown:
            raise ValueError(f"unknown regularization {unknown}; valid keys are {', '.join(REGULARIZERS)}")
        for key, weight in regularization.items():
            if not isinstance(weight, (int, float)) or not weight >= 0:
                raise ValueError(f"regularization weight {key}={weight!r} must be a number >= 0")
        if not isinstance(augment_dims, int) or augment_dims < 0:
            raise ValueError(f"augment_dims must be an integer >= 0, got {augment_dims!r}")
        check_condition_dim(condition_dim)
        if not isinstance(t1, (int, float)) or not t1 > 0:
            raise ValueError(f"t1 must be a number > 0, got {t1!r}")
        takes_c = accepts_condition(velocity)
        if condition_dim is not None and not takes_c:
            raise ValueError("condition_dim is set, but the velocity net's forward has no parameter named c")

        self.velocity = velocity
        self.latent = latent
        self.event_shape: tuple[int, ...] = tuple(latent.event_shape)
        self.trace: TraceMode = trace
        self.hutchinson: HutchinsonMode = hutchinson
        self.solver = solver
        self.rtol, self.atol = float(rtol), float(atol)
        self.train_rtol = self.rtol if train_rtol is None else float(train_rtol)
        self.train_atol = self.atol if train_atol is None else float(train_atol)
        self.step_size = None if step_size is None else float(step_size)
        self.adjoint = bool(adjoint)
        self.regularization = {key: float(regularization.get(key, 0.0)) for key in REGULARIZERS}
        self.augment_dims = augment_dims
        self.condition_dim = condition_dim
        self.t1 = float(t1)
        self.chunk_size = chunk_size
        self.max_num_steps = max_num_steps
        self.counter = NFECounter()
        self._takes_c = takes_c
        self._backward_mark = 0
        d = numel(self.event_shape)
        self._state_shape = self.event_shape if augment_dims == 0 else (d + augment_dims,)

    # -- NFE -----------------------------------------------------------------------------------
    @property
    def nfe_forward(self) -> int:
        """Function evaluations in the density direction (``log_prob``, ``loss``) since the reset.

        Example:
            >>> import torch, freeflows as ff
            >>> cnf = ff.CNF(2, hidden=8, solver="euler", step_size=0.5)
            >>> _ = cnf.log_prob(torch.randn(3, 2))
            >>> cnf.nfe_forward, cnf.nfe_sample  # two Euler steps
            (2, 0)
            >>> cnf.reset_nfe()
            >>> cnf.nfe_forward
            0
        """
        return self.counter.forward

    @property
    def nfe_backward(self) -> int:
        """Function evaluations differentiated through by training backward passes since the
        reset.

        Example:
            >>> import torch, freeflows as ff
            >>> cnf = ff.CNF(2, hidden=8, solver="euler", step_size=0.5)
            >>> cnf.loss(torch.randn(3, 2)).value.backward()
            >>> cnf.nfe_backward
            2
        """
        return self.counter.backward

    @property
    def nfe_sample(self) -> int:
        """Function evaluations in the sampling direction since the reset.

        Example:
            >>> import freeflows as ff
            >>> cnf = ff.CNF(2, hidden=8, solver="rk4", step_size=0.5)
            >>> _ = cnf.sample(3)
            >>> cnf.nfe_sample  # two rk4 steps of four evaluations
            8
        """
        return self.counter.sample

    def reset_nfe(self) -> None:
        """Zero the three counts of function evaluations (see :attr:`nfe_forward`)."""
        self.counter.reset()
        self._backward_mark = 0

    # -- geometry ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Elements of one event, :math:`D` (without augmented dimensions).

        Example:
            >>> import freeflows as ff
            >>> ff.CNF((2, 3), augment_dims=2).dim
            6
        """
        return numel(self.event_shape)

    def _subspace(self) -> tuple[Tensor | None, int]:
        r"""Probe basis :math:`\mathrm{blockdiag}(Q, I_k)` (or ``None``) and its number of columns."""
        q = getattr(self.latent, "basis", None)
        d, k = self.dim, self.augment_dims
        if q is None:
            return None, d + k
        m = q.shape[1]
        full = q.new_zeros(d + k, m + k)
        full[:d, :m] = q
        if k:
            full[d:, m:] = torch.eye(k, dtype=q.dtype, device=q.device)
        return full, m + k

    def _latent_log_prob(self, z: Tensor) -> Tensor:
        d = self.dim
        out = self.latent.log_prob(z[:, :d].reshape(z.shape[0], *self.event_shape))
        if self.augment_dims:
            out = out + _normal_log_prob(z[:, d:])
        return out

    # -- solves --------------------------------------------------------------------------------
    def _solve(
        self,
        dynamics: Dynamics,
        y0: Tensor | tuple[Tensor, ...],
        t0: float,
        t1: float,
        tolerances: tuple[float, float] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
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

    def _dynamics(self, direction: Literal["density", "transform", "sample"], **settings: Any) -> Dynamics:
        return Dynamics(self.velocity, self._state_shape, self._takes_c, self.counter, direction, **settings)

    def _density_dynamics(
        self, h: Tensor, c: Tensor | None, trace: TraceMode, generator: torch.Generator | None
    ) -> Dynamics:
        """The density ODE's right-hand side for flat states ``h``: the exact trace (projected on
        the latent's subspace) or one Hutchinson probe per row."""
        basis, m = self._subspace()
        basis = None if basis is None else basis.to(h)
        settings: dict = {"trace": trace, "condition": c, "chunk_size": self.chunk_size}
        if trace == "exact":
            settings["projector"] = None if basis is None else basis @ basis.T
        else:
            probe = hutchinson_vectors(
                1, h.shape[0], m, self.hutchinson, basis=basis, device=h.device, dtype=h.dtype,
                generator=generator,
            )
            settings["probe"] = probe[0]
        return self._dynamics("density", **settings)

    def integrate(
        self,
        x: Tensor,
        c: Tensor | None = None,
        *,
        trace: TraceMode | None = None,
        generator: torch.Generator | None = None,
        tolerances: tuple[float, float] | None = None,
    ) -> dict[str, Tensor]:
        r"""Solve the density ODE from ``x`` (already checked) and return the flat end state:
        ``z`` (``[B, D']``), ``log_prob`` (of the augmented point :math:`(x, a)` when augmented),
        ``trace_integral`` :math:`\ell(t_1)`, ``kinetic`` and ``jacobian`` (``[B]`` each), ``a``
        (the augmented draw, ``[B, k]``) and ``nfe`` (this solve's count).

        Args:
            x: checked data ``[B, *event]``.
            c: conditions ``[B, C]``, or ``None``.
            trace: ``"exact"`` or ``"hutchinson"``; ``None`` for the model's ``trace``.
            generator: random number generator for the probe and the augmented draw.
            tolerances: ``(rtol, atol)`` to use instead of the model's ``rtol``/``atol``.

        Returns:
            The dictionary above.

        Example:
            >>> import torch, freeflows as ff
            >>> cnf = ff.CNF(2, hidden=8)
            >>> out = cnf.integrate(torch.randn(3, 2))
            >>> sorted(out), out["z"].shape
            (['a', 'jacobian', 'kinetic', 'log_prob', 'nfe', 'trace_integral', 'z'], torch.Size([3, 2]))
        """
        trace = self.trace if trace is None else trace
        _check_trace(trace)
        batch = x.shape[0]
        h = x.reshape(batch, -1)
        a = h.new_zeros(batch, 0)
        if self.augment_dims:
            a = torch.randn(batch, self.augment_dims, generator=generator, dtype=h.dtype, device=h.device)
            h = torch.cat([h, a], dim=1)
        dynamics = self._density_dynamics(h, c, trace, generator)
        zeros = h.new_zeros(batch)
        before = self.counter.forward
        z, ell, kinetic, jacobian = self._solve(dynamics, (h, zeros, zeros, zeros), 0.0, self.t1, tolerances)
        log_prob = self._latent_log_prob(z) + ell
        return {
            "z": z,
            "log_prob": log_prob,
            "trace_integral": ell,
            "kinetic": kinetic,
            "jacobian": jacobian,
            "a": a,
            "nfe": torch.tensor(float(self.counter.forward - before), device=x.device),
        }

    # -- the model contract -------------------------------------------------------------------
    def log_prob(
        self,
        x: Tensor,
        c: Tensor | None = None,
        *,
        trace: TraceMode = "exact",
        augment_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Log-density ``[*batch]`` of ``x`` (``[*batch, *event]``) given ``c`` (``[C]`` or
        broadcastable to ``[*batch, C]``): :math:`\log p_Z(z(t_1)) + \int_0^{t_1} \operatorname{tr}
        \partial_x f\, dt`, exact up to the solver tolerances with ``trace="exact"`` (default).

        ``trace="hutchinson"`` returns an unbiased **estimate** instead (one probe per row).
        With ``augment_dims > 0`` the value is **an estimate, not the exact density**: the
        importance-sampling lower bound of the module docstring with ``augment_samples`` draws.

        Args:
            x: data ``[*batch, *event]``.
            c: conditions ``[C]`` or broadcastable to ``[*batch, C]``, or ``None``.
            trace: ``"exact"`` or ``"hutchinson"``.
            augment_samples: importance samples :math:`K` of the augmented coordinates.
            generator: random number generator for probes and augmented draws.

        Returns:
            ``[*batch]``.

        Example:
            >>> import math, torch, freeflows as ff
            >>> cnf = ff.CNF(2, hidden=8)  # the field starts at zero: the flow is the identity
            >>> torch.allclose(cnf.log_prob(torch.zeros(1, 2)), torch.tensor([-math.log(2 * math.pi)]))
            True
        """
        return self._per_row(
            self._log_prob, x, c, trace=trace, augment_samples=augment_samples, generator=generator
        )

    def _log_prob(
        self,
        x: Tensor,
        c: Tensor | None,
        trace: TraceMode = "exact",
        augment_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if not isinstance(augment_samples, int) or augment_samples < 1:
            raise ValueError(f"augment_samples must be a positive integer, got {augment_samples!r}")
        k = augment_samples if self.augment_dims else 1
        if k > 1:
            x = x.repeat(k, *([1] * (x.dim() - 1)))
            c = None if c is None else c.repeat(k, 1)
        out = self.integrate(x, c, trace=trace, generator=generator)
        log_prob = out["log_prob"]
        if self.augment_dims:
            log_prob = log_prob - _normal_log_prob(out["a"])
        if k > 1:
            log_prob = torch.logsumexp(log_prob.reshape(k, -1), dim=0) - math.log(k)
        return log_prob

    def loss(self, x: Tensor, c: Tensor | None = None) -> Loss:
        r"""Negative log-likelihood with the configured trace and the training tolerances
        ``train_rtol``/``train_atol``, plus the weighted RNODE terms:
        :math:`\mathrm{mean}(-\log p(x) + \lambda_K \mathcal K + \lambda_J \mathcal J)`.

        ``Loss.parts`` (batch means, detached): ``nll`` (a Hutchinson estimate with
        ``trace="hutchinson"``, the negative lower bound when augmented), ``kinetic``,
        ``jacobian`` (logged even when their weights are zero), ``nfe_forward`` (this solve) and
        ``nfe_backward`` (measured during the *previous* training backward pass, since this
        batch's has not happened yet; 0 at first).

        Args:
            x: data ``[*batch, *event]``.
            c: conditions ``[C]`` or broadcastable to ``[*batch, C]``, or ``None``.

        Returns:
            :class:`~freeflows.contract.Loss`.

        Example:
            >>> import torch, freeflows as ff
            >>> cnf = ff.CNF(2, hidden=8, trace="hutchinson", regularization={"jacobian": 0.1})
            >>> loss = cnf.loss(torch.randn(16, 2))
            >>> loss.value.backward()
            >>> float(loss.parts["nfe_backward"])  # no backward pass before this batch
            0.0
        """
        return super().loss(x, c)

    def _loss(self, x: Tensor, c: Tensor | None) -> Loss:
        nfe_backward = self.counter.backward - self._backward_mark
        self._backward_mark = self.counter.backward
        out = self.integrate(x, c, tolerances=(self.train_rtol, self.train_atol))
        nll = -out["log_prob"]
        if self.augment_dims:
            nll = nll + _normal_log_prob(out["a"])
        value = (
            nll
            + self.regularization["kinetic"] * out["kinetic"]
            + self.regularization["jacobian"] * out["jacobian"]
        ).mean()
        parts = {
            "nll": nll.mean().detach(),
            "kinetic": out["kinetic"].mean().detach(),
            "jacobian": out["jacobian"].mean().detach(),
            "nfe_forward": out["nfe"],
            "nfe_backward": torch.tensor(float(nfe_backward), device=x.device),
        }
        return Loss(value, parts)

    def _latent_draws(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``n`` flat latent draws ``[n, D + k]`` (with the augmented coordinates)."""
        h = self.latent.sample(n, generator=generator).reshape(n, -1)
        if self.augment_dims:
            a = torch.randn(n, self.augment_dims, generator=generator, dtype=h.dtype, device=h.device)
            h = torch.cat([h, a], dim=1)
        return h

    def rsample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Like :meth:`sample`, with gradients to the parameters through the ODE solve.

        Args:
            n: draws per condition.
            c: conditions ``[*cbatch, C]``, or ``None``.
            generator: random number generator, for reproducible draws.

        Returns:
            ``[n, *cbatch, *event]``.

        Example:
            >>> import freeflows as ff
            >>> x = ff.CNF(2, hidden=8).rsample(4)
            >>> x.shape, x.requires_grad
            (torch.Size([4, 2]), True)
        """
        return super().rsample(n, c, generator)

    def _rsample(self, n: int, c: Tensor | None, generator: torch.Generator | None) -> Tensor:
        h = self._latent_draws(n, generator)
        x = self._solve(self._dynamics("sample", condition=c), h, self.t1, 0.0)
        return x[:, : self.dim].reshape(n, *self.event_shape)

    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        r"""``n`` draws: :math:`z \sim p_Z` (and :math:`a \sim \mathcal N(0, I_k)`), integrated
        from :math:`t_1` back to 0 (augmented coordinates dropped). Shape ``[n, *event]``, or
        ``[n, *cbatch, *event]`` with ``c`` of shape ``[*cbatch, C]`` (``n`` draws for each
        condition). No gradients (see :meth:`rsample`).

        Args:
            n: draws per condition.
            c: conditions ``[*cbatch, C]``, or ``None``.
            generator: random number generator, for reproducible draws.

        Returns:
            ``[n, *event]``, or ``[n, *cbatch, *event]`` with a condition.

        Example:
            >>> import torch, freeflows as ff
            >>> cnf = ff.CNF(2, condition_dim=1, hidden=8)
            >>> cnf.sample(5, torch.randn(1)).shape, cnf.sample(5, torch.randn(3, 1)).shape
            (torch.Size([5, 2]), torch.Size([5, 3, 2]))
        """
        return super().sample(n, c, generator)

    def sample_and_log_prob(
        self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Draws as :meth:`sample` and their log-density (``[n, *cbatch]``) from one solve: the
        density ODE is integrated from :math:`(z, 0)` at :math:`t_1` back to 0, which gives
        :math:`\ell(0) = -\int_0^{t_1} \operatorname{tr} \partial_x f\, dt` and
        :math:`\log q(x) = \log p_Z(z) - \ell(0)`, with the model's trace (exact by default;
        ``trace="hutchinson"`` makes it an unbiased estimate). Not available with augmented
        dimensions, whose marginal density has no closed form.

        Args:
            n: draws per condition.
            c: conditions ``[*cbatch, C]``, or ``None``.
            generator: random number generator, for reproducible draws.

        Returns:
            ``(x, log_q)``, ``[n, *cbatch, *event]`` and ``[n, *cbatch]``.

        Example:
            >>> import torch, freeflows as ff
            >>> cnf = ff.CNF(2, hidden=8)
            >>> x, log_q = cnf.sample_and_log_prob(4)
            >>> torch.allclose(log_q, cnf.log_prob(x), atol=1e-4)
            True
        """
        return super().sample_and_log_prob(n, c, generator)

    def _sample_and_log_prob(
        self, n: int, c: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        if self.augment_dims:
            raise ValueError(
                "sample_and_log_prob needs augment_dims = 0: the marginal density of augmented "
                "draws is not available in closed form (log_prob gives a lower-bound estimate)"
            )
        h = self._latent_draws(n, generator)
        dynamics = self._density_dynamics(h, c, self.trace, generator)
        zeros = h.new_zeros(n)
        x, ell, _, _ = self._solve(dynamics, (h, zeros, zeros, zeros), self.t1, 0.0)
        return x.reshape(n, *self.event_shape), self._latent_log_prob(h) - ell

    def transform(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """The flow map data to latent, :math:`z = x(t_1)`, without the density.

        Args:
            x: data ``[*batch, *event]``.
            c: conditions ``[C]`` or broadcastable to ``[*batch, C]``, or ``None``.

        Returns:
            ``[*batch, *event]``, like ``x``.

        Example:
            >>> import torch, freeflows as ff
            >>> x = torch.randn(3, 2)
            >>> torch.allclose(ff.CNF(2, hidden=8).transform(x), x)  # the identity at first
            True
        """
        x, c, batch = self._check(x, c)
        if self.augment_dims:
            raise ValueError("transform is not defined with augmented dimensions (it needs a draw of a)")
        dynamics = self._dynamics("transform", condition=c)
        z = self._solve(dynamics, x.reshape(x.shape[0], -1), 0.0, self.t1)
        return z.reshape((*batch, *self.event_shape))

    @property
    def divergence_hint(self) -> str:
        """What to change when training keeps failing (read by the runner).

        Example:
            >>> import freeflows as ff
            >>> ff.CNF(2).divergence_hint.startswith("train with a fixed-step solver")
            True
        """
        return (
            "train with a fixed-step solver (solver=rk4 with step_size), a lower learning rate, "
            "looser train_rtol/train_atol, or RNODE regularisation (kinetic, jacobian > 0)"
        )

    def extra_repr(self) -> str:
        """The main settings, shown by ``repr``."""
        return (
            f"event_shape={self.event_shape}, trace={self.trace!r}, solver={self.solver!r}, "
            f"adjoint={self.adjoint}, augment_dims={self.augment_dims}, t1={self.t1}"
        )


def _check_trace(trace: str) -> None:
    if trace not in TRACE_MODES:
        raise ValueError(f"unknown trace {trace!r}; choose one of {', '.join(TRACE_MODES)}")


def _normal_log_prob(a: Tensor) -> Tensor:
    return -0.5 * a.square().sum(dim=-1) - 0.5 * a.shape[-1] * LOG_TWO_PI


__all__ = ["CNF", "Dynamics", "NFECounter"]
