r"""Builders of the equivariant particle-system models by name, for the tool (Boltzmann generators).

* ``fff-egnn``: a :class:`~freeflows.freeform.FreeFormFlow` whose encoder and decoder are
  :class:`~freeflows.nets.egnn.EGNN` flow maps and whose latent is
  :class:`~freeflows.distributions.MeanFreeNormal`.
* ``ecnf``: a :class:`~freeflows.continuous.CNF` (equivariant CNF) with an
  :class:`~freeflows.nets.egnn.EGNNVelocity` field and a :class:`MeanFreeNormal` latent.

Both need the number of particles :math:`N` and their dimension :math:`d`; they are read from the
data set's ``meta`` (``n_particles``, ``n_dims``), which the runner passes as ``meta=``. Their
``log_prob`` is the density with respect to the Lebesgue measure of the
:math:`(N-1)d`-dimensional mean-free subspace (zero centre of mass).

Every builder raises :class:`ValueError` on an unknown option, listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..checks import check_options
from ..continuous import CNF
from ..freeform import FreeFormFlow
from .cnf_builders import SOLVER_DEFAULTS

#: Options of ``fff-egnn`` and their defaults.
FFF_EGNN_DEFAULTS: dict[str, Any] = {
    "hidden": 32,
    "layers": 3,
    "attention": True,
    "beta": 10.0,
    "hutchinson": "gaussian",
    "hutchinson_samples": 1,
    "surrogate": "vjp",
}

#: Options of ``ecnf`` and their defaults.
ECNF_DEFAULTS: dict[str, Any] = {"hidden": 32, "layers": 3, "attention": True, **SOLVER_DEFAULTS}


def _options(kind: str, defaults: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    check_options(kind, options, defaults)
    return {**defaults, **options}


def particle_shape(
    kind: str, event_shape: tuple[int, ...], meta: Mapping[str, Any] | None
) -> tuple[int, int]:
    """``(n_particles, n_dims)`` from a data set's ``meta``, checked against ``event_shape``."""
    meta = meta or {}
    if "n_particles" not in meta or "n_dims" not in meta:
        raise ValueError(
            f"model kind {kind!r} needs a particle data set (data.name dw4 or lj13) whose meta gives "
            "n_particles and n_dims"
        )
    n, d = int(meta["n_particles"]), int(meta["n_dims"])
    if tuple(event_shape) != (n * d,):
        raise ValueError(f"{kind}: event shape {tuple(event_shape)} does not fit {n} particles in {d}-D")
    return n, d


def build_fff_egnn(
    event_shape: tuple[int, ...],
    condition_dim: int | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Free-form flow with EGNN encoder and decoder of the same size and a mean-free latent.
    A condition ``c`` (``condition_dim`` features) is added to every node's initial features."""
    o = _options("fff-egnn", FFF_EGNN_DEFAULTS, options)
    n, d = particle_shape("fff-egnn", event_shape, meta)
    return FreeFormFlow.egnn(
        n,
        d,
        condition_dim,
        hidden=o["hidden"],
        layers=o["layers"],
        attention=o["attention"],
        beta=o["beta"],
        hutchinson=o["hutchinson"],
        hutchinson_samples=o["hutchinson_samples"],
        surrogate=o["surrogate"],
    )


def build_ecnf(
    event_shape: tuple[int, ...],
    condition_dim: int | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Equivariant CNF: :class:`EGNNVelocity` field and a mean-free latent (unconditional)."""
    o = _options("ecnf", ECNF_DEFAULTS, options)
    if condition_dim:
        raise ValueError("ecnf is unconditional; this data set has conditions")
    n, d = particle_shape("ecnf", event_shape, meta)
    return CNF.egnn(
        n,
        d,
        hidden=o["hidden"],
        layers=o["layers"],
        attention=o["attention"],
        trace=o["trace"],
        hutchinson=o["hutchinson"],
        solver=o["solver"],
        rtol=o["rtol"],
        atol=o["atol"],
        train_rtol=o["train_rtol"],
        train_atol=o["train_atol"],
        step_size=o["step_size"],
        adjoint=o["adjoint"],
        regularization={"kinetic": o["kinetic"], "jacobian": o["jacobian"]},
        t1=o["t1"],
        chunk_size=o["chunk_size"],
        max_num_steps=o["max_num_steps"],
    )


PARTICLE_BUILDERS: dict[str, Callable[..., nn.Module]] = {"fff-egnn": build_fff_egnn, "ecnf": build_ecnf}
PARTICLE_DEFAULTS: dict[str, dict[str, Any]] = {"fff-egnn": FFF_EGNN_DEFAULTS, "ecnf": ECNF_DEFAULTS}
