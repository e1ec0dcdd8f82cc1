"""Builder of the continuous normalizing flow by name, for the tool.

``CNF_BUILDERS["cnf"](event_shape, condition_dim, **options)`` returns
``CNF(event_shape, condition_dim, ...)`` (:class:`~freeflows.continuous.CNF`: a
:class:`~freeflows.nets.velocity.TimeMLP` velocity on the flattened event and a standard normal
latent). Any option not listed in ``build.options``
raises :class:`ValueError` listing the valid ones. This module imports torchdiffeq only when a
model is solved, not when it is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..checks import check_options
from ..continuous import CNF

#: The trace, ODE solver and regulariser options shared by every CNF kind (``cnf``, ``ecnf``).
SOLVER_DEFAULTS: dict[str, Any] = {
    "trace": "exact",
    "hutchinson": "gaussian",
    "solver": "dopri5",
    "rtol": 1e-5,
    "atol": 1e-5,
    "train_rtol": None,
    "train_atol": None,
    "step_size": None,
    "adjoint": False,
    "kinetic": 0.0,
    "jacobian": 0.0,
    "t1": 1.0,
    "chunk_size": None,
    "max_num_steps": 10_000,
}

#: Every option of :func:`build` and its default.
DEFAULTS: dict[str, Any] = {
    "hidden": 64,
    "layers": 3,
    "activation": "tanh",
    "augment_dims": 0,
    **SOLVER_DEFAULTS,
}


def build(event_shape: tuple[int, ...] | int, condition_dim: int | None = None, **options: Any) -> nn.Module:
    """Build a :class:`~freeflows.continuous.CNF`.

    Options (defaults in :data:`DEFAULTS`): ``hidden``, ``layers``, ``activation`` of the
    :class:`~freeflows.nets.velocity.TimeMLP`; ``trace``, ``hutchinson``, ``solver``, ``rtol``,
    ``atol``, ``step_size``, ``adjoint``, ``augment_dims``, ``t1``, ``chunk_size``, ``max_num_steps`` of
    the CNF; ``kinetic`` and ``jacobian``, the RNODE weights :math:`\\lambda_K, \\lambda_J`.
    """
    check_options("cnf", options, DEFAULTS)
    opts = {**DEFAULTS, **options}
    shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
    regularization = {"kinetic": opts["kinetic"], "jacobian": opts["jacobian"]}
    return CNF(
        shape,
        condition_dim,
        hidden=opts["hidden"],
        layers=opts["layers"],
        activation=opts["activation"],
        augment_dims=opts["augment_dims"],
        trace=opts["trace"],
        hutchinson=opts["hutchinson"],
        solver=opts["solver"],
        rtol=opts["rtol"],
        atol=opts["atol"],
        train_rtol=opts["train_rtol"],
        train_atol=opts["train_atol"],
        step_size=opts["step_size"],
        adjoint=opts["adjoint"],
        regularization=regularization,
        t1=opts["t1"],
        chunk_size=opts["chunk_size"],
        max_num_steps=opts["max_num_steps"],
    )


build.options = tuple(DEFAULTS)  # type: ignore[attr-defined]

CNF_BUILDERS: dict[str, Callable[..., nn.Module]] = {"cnf": build}
