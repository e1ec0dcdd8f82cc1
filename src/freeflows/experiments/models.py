"""Model kinds of the tool: name -> builder ``(event_shape, condition_dim, **options) -> model``.

Every builder returns a model with the contract of :mod:`freeflows.contract`. The options of each
kind, with their defaults, form the config section ``model.<kind>``; ``model.kind`` picks one.
Builders that declare a keyword ``meta`` (the particle models ``fff-egnn`` and ``ecnf``, which
need ``n_particles`` and ``n_dims``) also receive the data set's ``meta``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..checks import check_options
from ..freeform import FreeFormFlow
from .classic_builders import CLASSIC_BUILDERS
from .particle_builders import PARTICLE_BUILDERS, PARTICLE_DEFAULTS

FFF_DEFAULTS: dict[str, Any] = {
    "beta": 50.0,
    "hidden": 128,
    "depth": 2,
    "blocks": 3,
    "hutchinson": "gaussian",
    "hutchinson_samples": 1,
    "surrogate": "vjp",
    "sample_refine_steps": 0,
}


def build_fff(event_shape: tuple[int, ...], condition_dim: int | None = None, **options: Any) -> nn.Module:
    """A free-form flow with residual-MLP encoder and decoder of the same size
    (:meth:`FreeFormFlow.resnet <freeflows.freeform.FreeFormFlow.resnet>`)."""
    check_options("fff", options, FFF_DEFAULTS)
    o = {**FFF_DEFAULTS, **options}
    if len(event_shape) != 1:
        raise ValueError(f"the fff model works on vectors; got event shape {tuple(event_shape)}")
    return FreeFormFlow.resnet(
        event_shape[0],
        condition_dim,
        hidden=o["hidden"],
        depth=o["depth"],
        blocks=o["blocks"],
        beta=o["beta"],
        hutchinson=o["hutchinson"],
        hutchinson_samples=o["hutchinson_samples"],
        surrogate=o["surrogate"],
        sample_refine_steps=o["sample_refine_steps"],
    )


def _cnf_builder() -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    from .cnf_builders import CNF_BUILDERS, DEFAULTS

    return CNF_BUILDERS["cnf"], dict(DEFAULTS)


def _keyword_defaults(builder: Callable[..., nn.Module], cls_name: str) -> dict[str, Any]:
    from .. import flows

    params = inspect.signature(getattr(flows, cls_name).__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


_CLASSIC_CLASSES = {
    "planar": "PlanarFlow",
    "nice": "NICE",
    "realnvp": "RealNVP",
    "glow": "Glow",
    "maf": "MAF",
    "iaf": "IAF",
}

MODEL_KINDS: dict[str, Callable[..., nn.Module]] = {"fff": build_fff, **CLASSIC_BUILDERS}
_cnf, _cnf_defaults = _cnf_builder()
MODEL_KINDS["cnf"] = _cnf
MODEL_KINDS.update(PARTICLE_BUILDERS)


def model_defaults() -> dict[str, dict[str, Any]]:
    """``{kind: {option: default}}`` for every model kind."""
    out: dict[str, dict[str, Any]] = {"fff": dict(FFF_DEFAULTS)}
    for kind, cls_name in _CLASSIC_CLASSES.items():
        out[kind] = _keyword_defaults(CLASSIC_BUILDERS[kind], cls_name)
    out["cnf"] = dict(_cnf_defaults)
    out.update({kind: dict(defaults) for kind, defaults in PARTICLE_DEFAULTS.items()})
    return out


def _takes_meta(builder: Callable[..., nn.Module]) -> bool:
    try:
        return "meta" in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


def build_model(
    model_cfg: dict[str, Any],
    event_shape: tuple[int, ...],
    condition_dim: int | None,
    meta: dict[str, Any] | None = None,
) -> nn.Module:
    """Build the model that ``model_cfg['kind']`` names with its options ``model_cfg[kind]``.
    ``meta`` (the data set's ``meta``) goes to the builders that take it."""
    kind = model_cfg["kind"]
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    builder = MODEL_KINDS[kind]
    options = dict(model_cfg.get(kind, {}))
    if _takes_meta(builder):
        options["meta"] = meta
    return builder(tuple(event_shape), condition_dim, **options)
