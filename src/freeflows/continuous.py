r"""Continuous normalizing flows (FFJORD), with RNODE regularisers and augmented dimensions.

A :class:`CNF` is a latent distribution :math:`p_Z` pushed through the flow map of
:math:`\dot x = f(t, x, c)` (:class:`~freeflows.transforms.ode.ODETransform`, which holds the
solves, the trace estimators, the RNODE integrals and the function-evaluation counts; its module
docstring has the maths). *Forward* carries the data :math:`x = x(0)` to the latent
:math:`z = x(t_1)`, and with :math:`\ell(t_1) = \int_0^{t_1} \operatorname{tr} \partial_x f\, dt`,

.. math:: \log p(x) = \log p_Z(z) + \ell(t_1).

(A field that expands volume, :math:`\operatorname{tr}\partial_x f > 0`, maps a region of data to
a larger region of latent, so the data density is *higher* than the latent density there.)
Sampling integrates :math:`\dot x = f` backwards from :math:`t_1` to :math:`0`, from
:math:`z \sim p_Z`.

**Tolerances.** :meth:`CNF.log_prob`, :meth:`CNF.sample` and :meth:`CNF.transform` always solve
with ``rtol``/``atol``. :meth:`CNF.loss` (training) solves with ``train_rtol``/``train_atol``,
which default to the same values; looser training tolerances (e.g. ``1e-3``) halve the cost of a
training step on toy data while the reported densities keep the tight ones.

**Trace.** :meth:`CNF.log_prob` uses the exact trace by default, whatever the training trace is;
:meth:`CNF.loss` uses the configured one (``"exact"`` or a ``"hutchinson"`` estimate).

**Latents on a subspace.** If ``latent.basis`` is an orthonormal :math:`Q \in \mathbb R^{D\times m}`
(e.g. :class:`~freeflows.distributions.MeanFreeNormal`), the field must keep trajectories in that
subspace (e.g. an equivariant, mean-free velocity), and the density is the one with respect to the
subspace's Lebesgue measure (the trace is :math:`\operatorname{tr}(Q^\top J Q)`).

**RNODE regularisers** (Finlay et al., 2020): the kinetic energy :math:`\mathcal K = \int
\lVert f\rVert^2 dt` and the Jacobian norm :math:`\mathcal J = \int \lVert \partial_x f
\rVert_F^2 dt` are integrated in every density solve (they are logged) and enter the loss only
with the weights of ``regularization``.

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

**NFE.** ``nfe_forward`` counts the density direction (``log_prob`` and ``loss``),
``nfe_sample`` the sampling direction, and ``nfe_backward`` the function evaluations that the
training backward pass differentiates through. ``reset_nfe()`` zeroes all three.

References:
    Chen, Rubanova, Bettencourt and Duvenaud, "Neural Ordinary Differential Equations" (2018),
    arXiv:1806.07366.

    Grathwohl, Chen, Bettencourt, Sutskever and Duvenaud, "FFJORD: Free-form Continuous Dynamics
    for Scalable Reversible Generative Models" (2018), arXiv:1810.01367.

    Finlay, Jacobsen, Nurbekyan and Oberman, "How to train your neural ODE: the world of Jacobian
    and kinetic regularization" (2020), arXiv:2002.02798.

    Dupont, Doucet and Teh, "Augmented Neural ODEs" (2019), arXiv:1904.01681.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_condition_dim, check_options, numel
from .conditioning import accepts_condition, resolve_condition_dim
from .contract import DensityModule, Loss
from .hutchinson import HUTCHINSON_MODES, HutchinsonMode
from .serialization import named_constructor
from .transforms.ode import (
    Dynamics,
    NFECounter,
    ODETransform,
    TraceMode,
    augment,
    augmented_basis,
    check_solver,
    check_trace,
    normal_log_prob,
)

REGULARIZERS: tuple[str, ...] = ("kinetic", "jacobian")
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

    @classmethod
    @named_constructor
    def molecules(
        cls,
        max_atoms: int,
        atom_features: int,
        n_dims: int = 3,
        condition_dim: int = 1,
        *,
        hidden: int = 64,
        layers: int = 4,
        attention: bool = True,
        **options: Any,
    ) -> CNF:
        r"""The equivariant CNF (E-NF) of molecules of up to ``max_atoms`` atoms, all sizes in
        one padded batch: events ``[max_atoms, n_dims + atom_features]`` and the atom count as
        the condition ``c`` (``[1]`` or ``[B, 1]``), as in
        :meth:`freeflows.FreeFormFlow.molecules`. The field is a masked
        :class:`~freeflows.nets.EGNNVelocity` on coordinates and features jointly, zero on the
        padding and blind to it, and the latent is
        :class:`~freeflows.distributions.MaskedMeanFreeNormal`; densities are with respect to
        each row's :math:`(n-1)d + nk`-dimensional subspace (the trace on all coordinates equals
        that on the subspace).

        Args:
            max_atoms: :math:`N`, the padded size.
            atom_features: :math:`k`, invariant channels per atom.
            n_dims: :math:`d`, coordinates per atom.
            condition_dim: condition features: 1, the atom count.
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
            >>> cnf = ff.CNF.molecules(5, atom_features=2, hidden=8, layers=1)
            >>> x = cnf.sample(2, torch.tensor([3.0]))
            >>> x.shape, bool((x[:, 3:] == 0).all())
            (torch.Size([2, 5, 5]), True)
        """
        from .distributions import MaskedMeanFreeNormal
        from .nets.egnn import EGNNVelocity

        if condition_dim != 1:
            raise ValueError("CNF.molecules takes the atom count alone as its condition (condition_dim=1)")
        velocity = EGNNVelocity(
            max_atoms, n_dims, hidden=hidden, layers=layers, attention=attention, features=atom_features,
            masked=True,
        )
        latent = MaskedMeanFreeNormal(max_atoms, n_dims, atom_features)
        return cls.from_velocity(velocity, latent, condition_dim=1, **options)

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
        check_trace(trace)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        check_solver(
            solver,
            rtol=rtol,
            atol=atol,
            step_size=step_size,
            max_num_steps=max_num_steps,
            t1=t1,
            extra_tolerances={"train_rtol": train_rtol, "train_atol": train_atol},
        )
        if hutchinson not in HUTCHINSON_MODES:
            choices = ", ".join(HUTCHINSON_MODES)
            raise ValueError(f"unknown Hutchinson mode {hutchinson!r}; choose one of {choices}")
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
        self._latent_takes_c = "c" in inspect.signature(latent.log_prob).parameters
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

    def _latent_log_prob(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        d = self.dim
        zx = z[:, :d].reshape(z.shape[0], *self.event_shape)
        out = self.latent.log_prob(zx, c) if self._latent_takes_c else self.latent.log_prob(zx)
        if self.augment_dims:
            out = out + normal_log_prob(z[:, d:])
        return out

    # -- solves --------------------------------------------------------------------------------
    def ode(self) -> ODETransform:
        """The ODE transform of the current settings, sharing this model's velocity and NFE counter
        (built on each call, so that changed settings, e.g. ``rtol``, take effect).

        Returns:
            :class:`~freeflows.transforms.ode.ODETransform` on flat states of ``D + augment_dims``
            numbers (the event shape without augmentation).

        Example:
            >>> import torch, freeflows as ff
            >>> cnf = ff.CNF(2, hidden=8)
            >>> z, log_det = cnf.ode()(torch.randn(3, 2))  # the identity at first
            >>> log_det.tolist()
            [0.0, 0.0, 0.0]
        """
        basis, _ = augmented_basis(getattr(self.latent, "basis", None), self.dim, self.augment_dims)
        return ODETransform(
            self.velocity,
            self._state_shape,
            trace=self.trace,
            hutchinson=self.hutchinson,
            basis=basis,
            solver=self.solver,
            rtol=self.rtol,
            atol=self.atol,
            step_size=self.step_size,
            adjoint=self.adjoint,
            t1=self.t1,
            chunk_size=self.chunk_size,
            max_num_steps=self.max_num_steps,
            counter=self.counter,
        )

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
        check_trace(trace)
        h, a = augment(x.reshape(x.shape[0], -1), self.augment_dims, generator)
        before = self.counter.forward
        z, ell, kinetic, jacobian = self.ode().solve_density(
            h, c, trace=trace, generator=generator, tolerances=tolerances
        )
        log_prob = self._latent_log_prob(z, c) + ell
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
            log_prob = log_prob - normal_log_prob(out["a"])
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
            nll = nll + normal_log_prob(out["a"])
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

    def _latent_draws(self, n: int, generator: torch.Generator | None, c: Tensor | None = None) -> Tensor:
        """``n`` flat latent draws ``[n, D + k]`` (with the augmented coordinates)."""
        if self._latent_takes_c:  # a latent whose support depends on c (MaskedMeanFreeNormal)
            h = self.latent.sample(n, c, generator=generator).reshape(n, -1)
        else:
            h = self.latent.sample(n, generator=generator).reshape(n, -1)
        return augment(h, self.augment_dims, generator)[0]

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
        h = self._latent_draws(n, generator, c)
        x = self.ode().inverse(h, c)
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
        h = self._latent_draws(n, generator, c)
        x, ell, _, _ = self.ode().solve_density(h, c, reverse=True, generator=generator)
        return x.reshape(n, *self.event_shape), self._latent_log_prob(h, c) - ell

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
        ode = self.ode()
        z = ode.solve(ode.dynamics("transform", condition=c), x.reshape(x.shape[0], -1), 0.0, self.t1)
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


__all__ = ["CNF", "Dynamics", "NFECounter"]
