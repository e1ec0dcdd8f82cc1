"""The examples in the library's docstrings run, and every public class and function has one.

One case per core module: its doctests (``Example:`` sections) must all pass, and there must be
some. The same examples run with ``python -m pytest --doctest-modules src/freeflows/<module>.py``.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io

import pytest

#: The core library's modules whose docstrings carry examples (not the tool's).
CORE_MODULES = [
    "freeflows",
    "freeflows.flows",
    "freeflows.freeform",
    "freeflows.continuous",
    "freeflows.checks",
    "freeflows.conditioning",
    "freeflows.contract",
    "freeflows.distributions",
    "freeflows.geometry",
    "freeflows.hutchinson",
    "freeflows.inverse_defect",
    "freeflows.inversion",
    "freeflows.jacobian",
    "freeflows.point_clouds",
    "freeflows.serialization",
    "freeflows.standardized",
    "freeflows.tangents",
    "freeflows.transforms",
    "freeflows.transforms.autoregressive",
    "freeflows.transforms.base",
    "freeflows.transforms.conditioner",
    "freeflows.transforms.coupling",
    "freeflows.transforms.glow",
    "freeflows.transforms.ode",
    "freeflows.transforms.planar",
    "freeflows.transforms.standardize",
    "freeflows.transforms.support",
    "freeflows.nets",
    "freeflows.nets.conv",
    "freeflows.nets.egnn",
    "freeflows.nets.resnet",
    "freeflows.nets.velocity",
]

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def run_examples(module: object) -> tuple[int, int, str]:
    """Run every doctest defined in ``module``; return (examples, failures, report)."""
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=OPTIONS, verbose=False)
    for test in doctest.DocTestFinder().find(module):
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    return result.attempted, result.failed, out.getvalue()


@pytest.mark.parametrize("name", CORE_MODULES)
def test_examples_run(name: str) -> None:
    attempted, failed, report = run_examples(importlib.import_module(name))
    assert attempted > 0, f"{name} has no examples"
    assert failed == 0, f"{failed} of {attempted} examples of {name} failed:\n{report}"


def _public_members(module: object) -> list[tuple[str, object]]:
    """Classes and functions defined in ``module`` (not imported) whose names are public."""
    return [
        (name, obj)
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == module.__name__
    ]


def _has_example(obj: object) -> bool:
    return ">>>" in (obj.__doc__ or "")


@pytest.mark.parametrize("name", CORE_MODULES)
def test_every_public_class_and_function_has_an_example(name: str) -> None:
    module = importlib.import_module(name)
    missing = [member for member, obj in _public_members(module) if not _has_example(obj)]
    assert not missing, f"{name}: no Example in the docstring of {', '.join(missing)}"


@pytest.mark.parametrize("name", CORE_MODULES)
def test_every_public_method_has_a_docstring(name: str) -> None:
    module = importlib.import_module(name)
    missing = []
    for cls_name, cls in _public_members(module):
        if not inspect.isclass(cls):
            continue
        for attr, value in vars(cls).items():
            if attr.startswith("_") and attr not in ("__call__", "__len__"):
                continue
            fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if inspect.isfunction(fn) and not (fn.__doc__ or "").strip():
                missing.append(f"{cls_name}.{attr}")
    assert not missing, f"{name}: no docstring on {', '.join(missing)}"


def test_a_broken_example_fails() -> None:
    """The runner above reports a wrong expected output as a failure."""
    broken = type(importlib)("broken")
    broken.__doc__ = ">>> 1 + 1\n3\n"
    attempted, failed, report = run_examples(broken)
    assert (attempted, failed) == (1, 1), report
