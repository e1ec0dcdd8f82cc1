"""The model kinds of the tool: ``model.kind`` -> a library constructor, in one registry.

Each kind names one library constructor (a class or a named classmethod). Its options, and their
defaults, are the constructor's keyword-only parameters, read from its signature, so that every
default lives in one place, the constructor; the config section ``model.<kind>`` holds them.
What the registry adds is only how the data set's shape reaches the constructor's positional
arguments:

* :func:`vector`: ``features`` = ``D`` of vector data (``[D]`` events);
* :func:`event`: the whole event shape (images for Glow, or any shape for the CNF);
* :func:`particles`: ``n_particles`` and ``n_dims`` from the data set's ``meta``, checked against
  the event shape.

The condition size goes to a constructor parameter named ``condition_dim``; a constructor without
one is unconditional, and conditional data is refused with one line. A constructor that takes
``regularization`` (the CNF's RNODE weights, a dict) shows it as one flat option per weight
(``kinetic``, ``jacobian``; 0 when unset, as the constructor does). A constructor that passes
``**options`` on (``CNF.egnn``) lists the options it passes with ``passes``.

Adding a kind is one line::

    register("fff-egnn", FreeFormFlow.egnn, particles)

Unknown kinds and options raise :class:`ValueError` naming the valid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..checks import check_options
from ..continuous import CNF, REGULARIZERS, SOLVER_OPTIONS
from ..flows import IAF, MAF, NICE, Glow, PlanarFlow, RealNVP
from ..freeform import FreeFormFlow

#: ``(kind, event_shape, meta) -> positional arguments`` of a constructor.
Arguments = Callable[[str, tuple[int, ...], Mapping[str, Any] | None], tuple[Any, ...]]


def vector(kind: str, event_shape: tuple[int, ...], meta: Mapping[str, Any] | None = None) -> tuple[int]:
    """``(D,)`` for vector data of event shape ``[D]``.

    Args:
        kind: the model kind, for the message.
        event_shape: the data set's event shape.
        meta: the data set's ``meta`` (unused).

    Returns:
        ``(D,)``.
    """
    if len(event_shape) != 1:
        raise ValueError(f"the {kind} model works on vectors; got event shape {tuple(event_shape)}")
    return (int(event_shape[0]),)


def event(
    kind: str, event_shape: tuple[int, ...], meta: Mapping[str, Any] | None = None
) -> tuple[tuple[int, ...]]:
    """``(event_shape,)``: the constructor takes the whole event shape.

    Args:
        kind: the model kind (unused).
        event_shape: the data set's event shape.
        meta: the data set's ``meta`` (unused).

    Returns:
        ``(event_shape,)``.
    """
    return (tuple(event_shape),)


def particles(kind: str, event_shape: tuple[int, ...], meta: Mapping[str, Any] | None) -> tuple[int, int]:
    """``(n_particles, n_dims)`` from a particle data set's ``meta``, checked against the event
    shape ``[n_particles * n_dims]``.

    Args:
        kind: the model kind, for the message.
        event_shape: the data set's event shape.
        meta: the data set's ``meta`` with ``n_particles`` and ``n_dims``.

    Returns:
        ``(n_particles, n_dims)``.
    """
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


def molecules(
    kind: str, event_shape: tuple[int, ...], meta: Mapping[str, Any] | None
) -> tuple[int, int, int]:
    """``(max_atoms, atom_features, n_dims)`` of a molecule data set (events ``[N, d + k]``,
    ``meta["n_dims"]`` the coordinates per atom).

    Args:
        kind: the model kind, for the message.
        event_shape: the data set's event shape.
        meta: the data set's ``meta`` with ``n_dims``.

    Returns:
        ``(N, k, d)``.
    """
    meta = meta or {}
    if len(event_shape) != 2 or "n_dims" not in meta:
        raise ValueError(f"model kind {kind!r} needs a molecule data set (data.name qm9)")
    d = int(meta["n_dims"])
    return int(event_shape[0]), int(event_shape[1]) - d, d


def _keyword_defaults(constructor: Callable[..., Any]) -> tuple[dict[str, Any], set[str]]:
    """The keyword-only parameters of ``constructor`` with their defaults, and all its parameter
    names (to see whether it takes ``condition_dim``)."""
    target = constructor.__init__ if inspect.isclass(constructor) else constructor
    params = inspect.signature(target).parameters
    defaults = {
        name: p.default for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    return defaults, set(params)


@dataclass(frozen=True)
class ModelKind:
    """One model kind: the constructor and how the data's shape reaches it.

    Args:
        name: the kind, as ``model.kind`` names it.
        constructor: the library constructor (a class or a named classmethod).
        arguments: :func:`vector`, :func:`event`, :func:`particles`, or any function
            ``(kind, event_shape, meta) -> positional arguments``.
        passes: for a constructor that forwards ``**options``: the constructor whose keyword
            defaults those options take and their names.
    """

    name: str
    constructor: Callable[..., nn.Module]
    arguments: Arguments
    passes: tuple[Callable[..., Any], Sequence[str]] | None = None
    defaults: dict[str, Any] = field(init=False, repr=False)
    conditional: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        defaults, names = _keyword_defaults(self.constructor)
        if self.passes is not None:
            other, keys = self.passes
            more, _ = _keyword_defaults(other)
            defaults.update({key: more[key] for key in keys if key not in defaults})
        if "regularization" in defaults:
            flat = {}
            for key, value in defaults.items():
                if key == "regularization":
                    flat.update({weight: 0.0 for weight in REGULARIZERS})
                else:
                    flat[key] = value
            defaults = flat
        object.__setattr__(self, "defaults", defaults)
        object.__setattr__(self, "conditional", "condition_dim" in names)

    def build(
        self,
        event_shape: tuple[int, ...],
        condition_dim: int | None = None,
        meta: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> nn.Module:
        """Build the model for data of ``event_shape`` with ``condition_dim`` condition features.

        Args:
            event_shape: the data set's event shape.
            condition_dim: condition features, or ``None``.
            meta: the data set's ``meta`` (the particle kinds read ``n_particles`` and ``n_dims``).
            options: the kind's options; the others keep the constructor's defaults.

        Returns:
            The model.
        """
        check_options(self.name, options, self.defaults)
        shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
        kwargs = dict(options)
        if any(weight in kwargs for weight in REGULARIZERS):
            kwargs["regularization"] = {w: float(kwargs.pop(w)) for w in REGULARIZERS if w in kwargs}
        if self.conditional:
            kwargs["condition_dim"] = condition_dim
        elif condition_dim:
            raise ValueError(f"{self.name} is unconditional; this data set has conditions")
        return self.constructor(*self.arguments(self.name, shape, meta), **kwargs)


#: Every model kind, by name, in the order the tool lists them.
MODEL_KINDS: dict[str, ModelKind] = {}


def register(
    name: str,
    constructor: Callable[..., nn.Module],
    arguments: Arguments = vector,
    passes: tuple[Callable[..., Any], Sequence[str]] | None = None,
) -> ModelKind:
    """Add a model kind to :data:`MODEL_KINDS` (see the module docstring).

    Args:
        name: the kind, as ``model.kind`` names it.
        constructor: the library constructor.
        arguments: how the data's shape becomes its positional arguments.
        passes: for a constructor with ``**options``: ``(constructor, option names)``.

    Returns:
        The :class:`ModelKind`.
    """
    if name in MODEL_KINDS:
        raise ValueError(f"model kind {name!r} is already registered")
    MODEL_KINDS[name] = kind = ModelKind(name, constructor, arguments, passes)
    return kind


register("fff", FreeFormFlow.resnet)
register("planar", PlanarFlow)
register("nice", NICE)
register("realnvp", RealNVP)
register("glow", Glow, event)
register("maf", MAF)
register("iaf", IAF)
register("cnf", CNF, event)
register("fff-egnn", FreeFormFlow.egnn, particles)
register("ecnf", CNF.egnn, particles, passes=(CNF, SOLVER_OPTIONS))
register("fff-conv", FreeFormFlow.conv, event)
register("fff-molecules", FreeFormFlow.molecules, molecules)
register("ecnf-molecules", CNF.molecules, molecules, passes=(CNF, SOLVER_OPTIONS))


def model_kind(name: str) -> ModelKind:
    """The registered kind ``name``; an unknown one raises :class:`ValueError` listing them.

    Args:
        name: the kind.

    Returns:
        :class:`ModelKind`.
    """
    if name not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {name!r}; choose one of {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[name]


def model_defaults() -> dict[str, dict[str, Any]]:
    """``{kind: {option: default}}`` for every model kind, the ``model`` section of the config.

    Returns:
        A fresh dict.
    """
    return {name: dict(kind.defaults) for name, kind in MODEL_KINDS.items()}


def build_model(
    model_cfg: Mapping[str, Any],
    event_shape: tuple[int, ...],
    condition_dim: int | None,
    meta: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build the model that ``model_cfg['kind']`` names with its options ``model_cfg[kind]``.

    Args:
        model_cfg: the config's ``model`` section (``kind`` and the options of that kind).
        event_shape: the data set's event shape.
        condition_dim: condition features, or ``None``.
        meta: the data set's ``meta``.

    Returns:
        The model.
    """
    kind = model_kind(model_cfg["kind"])
    return kind.build(tuple(event_shape), condition_dim, meta, **dict(model_cfg.get(kind.name) or {}))
