"""The layers: the library (the package root, transforms/ and nets/) imports only torch (and
torchdiffeq lazily, inside a CNF solve); it never imports the tool (data/, eval/, plots/,
experiments/, runner/, bench/, cli) or the tool's dependencies."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import freeflows

TOOL = {"bench", "cli", "data", "eval", "experiments", "plots", "presets", "runner"}
HEAVY = ("lightning", "pytorch_lightning", "matplotlib", "yaml", "sklearn", "pandas", "sbibm", "sbi", "rdkit",
         "scipy", "tqdm", "torchdiffeq", "zuko")
PACKAGE = Path(freeflows.__file__).parent


def core_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="freeflows."):
        if info.name.split(".")[1] not in TOOL:
            names.append(info.name)
    return sorted(names)


def test_the_core_is_what_it_should_be():
    names = core_modules()
    assert "freeflows.freeform" in names and "freeflows.transforms.coupling" in names
    assert not any(n.split(".")[1] in TOOL for n in names)


def test_core_modules_import_nothing_heavy():
    """All core modules in one fresh interpreter; torch itself imports tqdm, so that one is
    only checked against what ``import torch`` already loads."""
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        f"for name in {core_modules()!r}:\n"
        "    __import__(name)\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules and m not in before]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module", core_modules())
def test_core_module_never_imports_the_tool(module):
    """Statically, so that a lazy import inside a function counts too."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    depth = len(module.split(".")) - (1 if path.name == "__init__.py" else 2)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level > depth + 1:
                    continue
                base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            assert not (parts[0] == "freeflows" and len(parts) > 1 and parts[1] in TOOL), (module, name)
