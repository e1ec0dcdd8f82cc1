r"""Saving and loading whole models: :func:`save` and :func:`load`.

A saved model is one file written by :func:`torch.save` holding only plain Python values and
tensors, so that :func:`torch.load` reads it with ``weights_only=True`` (torch's default):

* the class name and the named constructor that built the model, with its arguments (ints,
  floats, strings, ``None``, and lists, tuples and dicts of them);
* the values of the settings that may change after construction (for example a free-form flow's
  ``sample_refine_steps`` or a CNF's tolerances);
* the floating dtype and the ``state_dict``.

:func:`load` calls the same constructor with the same arguments, casts to the dtype, restores the
settings and loads the state dict, so the model is restored exactly.

**Which models.** Every model built by a named constructor: :class:`~freeflows.flows.PlanarFlow`,
:class:`~freeflows.flows.NICE`, :class:`~freeflows.flows.RealNVP`, :class:`~freeflows.flows.Glow`,
:class:`~freeflows.flows.MAF`, :class:`~freeflows.flows.IAF`, ``CNF(features, ...)``,
``CNF.egnn(...)``, ``FreeFormFlow.resnet(...)`` and ``FreeFormFlow.egnn(...)``. A model built
from your own networks (``FreeFormFlow(encoder, decoder, latent)``, ``CNF.from_velocity(...)``,
``Flow(transform, latent)``) cannot be rebuilt from plain values: :func:`save` refuses it, and
you save its ``state_dict`` and rebuild the networks yourself::

    torch.save(model.state_dict(), path)
    model = FreeFormFlow(MyEncoder(), MyDecoder(), StandardNormal(d))  # the same code as before
    model.load_state_dict(torch.load(path, weights_only=True))

Example:
    >>> import tempfile, pathlib, torch, freeflows as ff
    >>> model = ff.FreeFormFlow.resnet(2, condition_dim=1, hidden=16, beta=20.0)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.pt"
    >>> ff.save(model, path)
    >>> same = ff.load(path)
    >>> x, c = torch.randn(4, 2), torch.randn(4, 1)
    >>> torch.equal(same.log_prob(x, c, variant="paper"), model.log_prob(x, c, variant="paper"))
    True
    >>> same.beta
    20.0
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from .contract import DensityModule

FORMAT = "freeflows.model"
VERSION = 1

F = TypeVar("F", bound=Callable[..., Any])


def named_constructor(fn: F) -> F:
    """Decorate a model's constructor (``__init__`` or a classmethod) so that it records its
    arguments on the model it builds, and :func:`save` can call it again. The outermost recorded
    call wins (a named flow's ``__init__`` that calls its base class's is recorded once).

    Args:
        fn: the constructor; its arguments must be plain values (no ``*args``).

    Returns:
        The wrapped constructor, marked with ``named_constructor = True``.

    Example:
        >>> import freeflows as ff
        >>> name, arguments = ff.RealNVP(3, transforms=2)._constructor
        >>> name, arguments["features"], arguments["transforms"], arguments["hidden"]  # with defaults
        ('__init__', 3, 2, 64)
        >>> ff.FreeFormFlow.resnet(2, hidden=8)._constructor[0]
        'resnet'
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(first: Any, *args: Any, **kwargs: Any) -> Any:
        result = fn(first, *args, **kwargs)
        bound = signature.bind(first, *args, **kwargs)
        bound.apply_defaults()
        arguments: dict[str, Any] = {}
        for i, (name, value) in enumerate(bound.arguments.items()):
            kind = signature.parameters[name].kind
            if i == 0:  # self or cls
                continue
            if kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                raise TypeError(f"{fn.__qualname__}: *args cannot be recorded")
            else:
                arguments[name] = value
        model = first if fn.__name__ == "__init__" else result
        model._constructor = (fn.__name__, arguments)
        return result

    wrapper.named_constructor = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"cannot save {where}: dict key {k!r} is not a string")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise ValueError(
        f"cannot save {where} = {value!r}: only ints, floats, strings, None, and lists, tuples "
        "and dicts of them can be saved"
    )


def _model_class(name: str) -> type:
    import freeflows

    cls = getattr(freeflows, name, None)
    if not (isinstance(cls, type) and issubclass(cls, DensityModule)):
        raise ValueError(f"{name!r} is not a freeflows model class")
    return cls


def _constructor(cls: type, name: str) -> Callable[..., Any]:
    fn = getattr(cls, name, None)
    if fn is None or not getattr(fn, "named_constructor", False):
        raise ValueError(f"{cls.__name__}.{name} is not a named constructor of freeflows")
    return cls if name == "__init__" else fn


def _dtype(model: nn.Module) -> str:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return str(t.dtype).removeprefix("torch.")
    return str(torch.get_default_dtype()).removeprefix("torch.")


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path`` so that :func:`load` restores it exactly (see the module
    docstring for the format and for which models this covers).

    Args:
        model: a model built by a named constructor of freeflows.
        path: the file to write.

    Raises:
        ValueError: if the model was not built by a named constructor of freeflows (save its
            ``state_dict`` instead), or if a recorded argument is not a plain value.

    Example:
        >>> import tempfile, pathlib, torch, freeflows as ff
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "maf.pt"
        >>> ff.save(ff.MAF(3, transforms=2).double(), path)
        >>> sorted(torch.load(path, weights_only=True))
        ['arguments', 'class', 'constructor', 'dtype', 'format', 'settings', 'state_dict', 'version']
    """
    recorded = getattr(model, "_constructor", None)
    cls = type(model)
    exported = None
    if isinstance(model, DensityModule):
        try:
            exported = _model_class(cls.__name__)
        except ValueError:
            exported = None
    if recorded is None or exported is not cls:
        raise ValueError(
            f"freeflows.save covers models built by a named constructor (RealNVP(features), "
            f"CNF(features), FreeFormFlow.resnet(features), ...); this {cls.__name__} was built "
            "from your own networks: save model.state_dict() and rebuild it with the same code"
        )
    name, arguments = recorded
    _check_plain(arguments, f"the arguments of {cls.__name__}")
    settings = {key: getattr(model, key) for key in model._settings}
    _check_plain(settings, f"the settings of {cls.__name__}")
    torch.save(
        {
            "format": FORMAT,
            "version": VERSION,
            "class": cls.__name__,
            "constructor": name,
            "arguments": dict(arguments),
            "settings": settings,
            "dtype": _dtype(model),
            "state_dict": model.state_dict(),
        },
        path,
    )


def load(path: str | os.PathLike[str], map_location: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save`: the same constructor with the same arguments,
    dtype, settings and weights. The file is read with ``weights_only=True``.

    Args:
        path: a file written by :func:`save`.
        map_location: passed to :func:`torch.load`; the model is moved to the device of its
            tensors.

    Returns:
        The model, in training mode, as a freshly built one is.

    Raises:
        ValueError: if the file was not written by :func:`save`, or by a version of freeflows
            with another format.

    Example:
        >>> import tempfile, pathlib, torch, freeflows as ff
        >>> model = ff.CNF(2, hidden=8, rtol=1e-4, atol=1e-4)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "cnf.pt"
        >>> ff.save(model, path)
        >>> same = ff.load(path)
        >>> type(same).__name__, same.rtol, same.training
        ('CNF', 0.0001, True)
    """
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a model saved by freeflows.save")
    if payload.get("version") != VERSION:
        version = payload.get("version")
        raise ValueError(f"{path} has format version {version}; this freeflows reads {VERSION}")
    cls = _model_class(payload["class"])
    build = _constructor(cls, payload["constructor"])
    model = build(**payload["arguments"])
    model.to(getattr(torch, payload["dtype"]))
    for key, value in payload["settings"].items():
        setattr(model, key, value)
    state = payload["state_dict"]
    model.load_state_dict(state)
    device = next((t.device for t in state.values() if isinstance(t, torch.Tensor)), None)
    if device is not None:
        model.to(device)
    return model
