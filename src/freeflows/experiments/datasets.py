"""Data sets of the tool by name: ``data.name`` in a config -> :class:`~freeflows.data.base.DataSet`.

``data.name: file`` is a user's own ``.npy``/``.npz``/``.csv`` file (:mod:`freeflows.data.user`);
its ``data.options`` hold the file's absolute ``path`` and ``sha256``, so a run can be reloaded
only with the very file it was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.base import DataSet
from ..data.toy import TOY, load_toy

PARTICLES = ("dw4", "lj13")


def data_names() -> list[str]:
    """The values ``data.name`` accepts (the error for an unknown data set lists them): the toy sets,
    the particle systems, ``digits``, ``qm9``, ``sbi:<task>`` and ``file``."""
    return [*TOY, *PARTICLES, "digits", "qm9", "sbi:<task>", "file"]


def file_data_section(
    path: str | Path, condition_columns: list[str] | None = None, **options: Any
) -> dict[str, Any]:
    """The ``data`` section of a config for a user's file: ``name: file`` and its options (see
    :data:`~freeflows.data.user.FILE_OPTIONS`), with the file's absolute path and SHA-256. The
    file is read and checked now, so a bad file fails before a run directory exists."""
    from ..data.user import check_file_options, file_sha256, read_data_file, split_sizes

    path = Path(path).expanduser().resolve()
    o = check_file_options({**options, "path": str(path), "condition_columns": condition_columns})
    table = read_data_file(path, o["condition_columns"])
    split_sizes(table.x.shape[0], o["val"], o["test"], path.name)
    o["sha256"] = file_sha256(path)
    return {"name": "file", "options": o}


def resolve_file_data(cfg: dict[str, Any]) -> dict[str, Any]:
    """For ``data.name: file`` without ``data.options.sha256`` (a YAML config or ``--set``),
    make the path absolute and record the file's hash; the other keys stay as they are."""
    data = cfg["data"]
    options = dict(data.get("options") or {})
    if data["name"] != "file" or options.get("sha256"):
        return cfg
    if not options.get("path"):
        raise ValueError("data.name=file needs data.options.path (or use `freeflows train --data PATH`)")
    cols = options.pop("condition_columns", None)
    section = file_data_section(options.pop("path"), cols, **options)
    return {**cfg, "data": {**data, "options": section["options"]}}


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
    if name == "digits":  # a fixed split (data.options.split_seed); n_val and n_test are not used
        from ..data.digits import OPTIONS, load_digits

        if set(options) - set(OPTIONS):
            unknown = sorted(set(options) - set(OPTIONS))
            raise ValueError(f"data.options {unknown} are not used by digits; it takes {', '.join(OPTIONS)}")
        return load_digits(data_cfg["n_train"], **options)
    if name == "qm9":  # EDM's splits (or the shipped slice); data.options: source, nll_rows
        from ..data.molecule_events import load_qm9_events

        if "eval_samples" in options:
            raise ValueError("the number of generated molecules to score is eval.samples, not data.options")

        sizes = data_cfg["n_train"], data_cfg["n_val"], data_cfg["n_test"]
        return load_qm9_events(*sizes, seed=seed, **options)
    if name.startswith("sbi:"):
        from ..data.sbi import load_sbi_task

        return load_sbi_task(name[4:], budget=data_cfg["n_train"], seed=seed, **options)
    if name == "file":
        from ..data.user import load_file

        return load_file(options, seed=seed)
    hint = ""
    if Path(str(name)).suffix.lower() in (".npy", ".npz", ".csv"):
        hint = f" (for your own file use `freeflows train --data {name}`)"
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(data_names())}{hint}")
