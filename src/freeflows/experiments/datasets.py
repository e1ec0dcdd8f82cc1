"""Data sets of the tool by name: ``data.name`` in a config -> :class:`~freeflows.data.base.DataSet`."""

from __future__ import annotations

from typing import Any

from ..data.base import DataSet
from ..data.toy import TOY, load_toy

PARTICLES = ("dw4", "lj13")


def data_names() -> list[str]:
    return [*TOY, *PARTICLES, "sbi:<task>"]


def build_data(data_cfg: dict[str, Any], seed: int) -> DataSet:
    """Make the splits a config asks for; they depend only on the config and ``seed``."""
    name, options = data_cfg["name"], dict(data_cfg.get("options") or {})
    if name in TOY:
        if options:
            raise ValueError(f"data.options {sorted(options)} are not used by toy data set {name!r}")
        return load_toy(name, data_cfg["n_train"], data_cfg["n_val"], data_cfg["n_test"], seed=seed)
    if name in PARTICLES:
        from ..data import particles

        loader = particles.load_dw4 if name == "dw4" else particles.load_lj13
        return loader(seed=seed, n_train=data_cfg["n_train"], **options)
    if name.startswith("sbi:"):
        from ..data.sbi import load_sbi_task

        return load_sbi_task(name[4:], budget=data_cfg["n_train"], seed=seed, **options)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(data_names())}")
