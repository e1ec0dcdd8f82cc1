r"""A researcher's own data from a file: ``.npy``, ``.npz`` or ``.csv`` -> :class:`DataSet`.

Formats (rows are samples, columns are features):

* ``.npy``: one 2-D numeric array ``[N, D]``.
* ``.npz``: an array ``x`` ``[N, D]`` and optionally ``c`` ``[N, C]`` (or ``[N]``) of conditions.
* ``.csv``: a header row of column names, then one row per sample; the columns named in
  ``condition_columns`` are the conditions, the others the features.

Every problem with a file (missing, unreadable, unknown extension, wrong rank, empty, a
non-numeric column, NaN or infinite values, too few rows for the splits) raises a
:class:`DataFileError` (a ``ValueError``) or ``FileNotFoundError`` whose message is one line
naming the file and, where it applies, the offending rows or column.

:func:`load_file` shuffles the rows with the seed and cuts them into train/validation/test splits
(fractions, or row counts when given as integers). The splits stay in the file's units; with
``standardize=True`` the data set carries a :class:`~freeflows.transforms.standardize.Standardizer`
fitted on the training split, and the runner wraps each model in
:class:`~freeflows.standardized.StandardizedModel`, so the model learns z-scored data while
its ``log_prob`` and ``sample`` are in the file's units.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..standardized import StandardizedModel
from ..transforms.standardize import Standardizer
from .base import DataSet, Split

#: The file formats that :func:`read_data_file` reads.
EXTENSIONS: tuple[str, ...] = (".npy", ".npz", ".csv")

#: The options of a file data set (``data.options`` in a config) and their defaults.
FILE_OPTIONS: dict[str, Any] = {
    "path": None,
    "sha256": None,
    "condition_columns": None,
    "val": 0.1,
    "test": 0.1,
    "standardize": True,
}

#: Fewest rows of each split: the standardisation needs two training rows, the runner one
#: validation and one test row.
MIN_ROWS = {"training": 2, "validation": 1, "test": 1}


class DataFileError(ValueError):
    """A user's data file cannot be used; the message is one line naming the file and the fault."""


@dataclass
class Table:
    """The numbers of a data file.

    Attributes:
        x: features ``[N, D]``, float64.
        c: conditions ``[N, C]``, float64, or ``None``.
        feature_names: the CSV column names of ``x`` (``None`` for ``.npy``/``.npz``).
        condition_names: the CSV column names of ``c`` (``None`` for ``.npy``/``.npz``).
    """

    x: np.ndarray
    c: np.ndarray | None = None
    feature_names: list[str] | None = None
    condition_names: list[str] | None = None


def file_sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _row_list(rows: np.ndarray, csv_lines: bool) -> str:
    """``"rows 3, 17 (counting from 0)"`` or, for a CSV file, ``"lines 5, 19"``; at most 5 named."""
    shown = [int(r) + 2 if csv_lines else int(r) for r in rows[:5]]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    what = "line" if csv_lines else "row"
    label = f"{what}{'s' if len(rows) > 1 else ''} {', '.join(map(str, shown))}{more}"
    return label if csv_lines else f"{label} (counting from 0)"


def _numeric(array: np.ndarray, name: str, what: str) -> np.ndarray:
    """``array`` as float64 if its dtype is boolean, integer or real, else a one-line error."""
    if array.dtype.kind in "biuf":
        return array.astype(np.float64)
    kind = "complex" if array.dtype.kind == "c" else f"not numeric (dtype {array.dtype})"
    raise DataFileError(f"{what} of {name} is {kind}; it must hold real numbers")


def _two_d(array: np.ndarray, name: str, what: str) -> np.ndarray:
    if array.ndim != 2:
        hint = "; reshape it to [N, 1] for one feature" if array.ndim == 1 else ""
        raise DataFileError(
            f"{what} of {name} has shape {tuple(array.shape)}; it must be 2-D [rows, features]{hint}"
        )
    return array


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(6)
    except OSError as err:
        raise DataFileError(f"cannot read {path.name}: {err.strerror or err}") from None


def _read_npy(path: Path) -> Table:
    magic = _magic(path)
    if magic.startswith(b"PK"):
        raise DataFileError(f"cannot read {path.name} as a .npy file: it is an .npz archive; rename it")
    if magic != b"\x93NUMPY":
        raise DataFileError(f"cannot read {path.name} as a .npy file: it does not start with the NPY header")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any failure to parse the file is the same user error
        raise DataFileError(f"cannot read {path.name} as a .npy file: {_first_line(err)}") from None
    return Table(_numeric(_two_d(array, path.name, "the array"), path.name, "the array"))


def _read_npz(path: Path) -> Table:
    if _magic(path) == b"\x93NUMPY":
        raise DataFileError(f"{path.name} is a .npy file, not an .npz archive; rename it")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if "x" not in names:
                raise DataFileError(
                    f"{path.name} has no array 'x' (it holds: {', '.join(names) or 'nothing'}); "
                    "save the samples as x, and any conditions as c"
                )
            extra = sorted(set(names) - {"x", "c"})
            if extra:
                raise DataFileError(
                    f"{path.name} holds unexpected arrays {', '.join(extra)}; "
                    "it may hold only x (samples) and c (conditions)"
                )
            x, c = archive["x"], archive["c"] if "c" in names else None
    except DataFileError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt archive or member is the same user error
        raise DataFileError(f"cannot read {path.name} as an .npz file: {_first_line(err)}") from None
    x = _numeric(_two_d(x, path.name, "array 'x'"), path.name, "array 'x'")
    if c is not None:
        if c.ndim == 1:
            c = c[:, None]
        c = _numeric(_two_d(c, path.name, "array 'c'"), path.name, "array 'c'")
        if c.shape[0] != x.shape[0]:
            raise DataFileError(
                f"{path.name}: array 'c' has {c.shape[0]} rows but 'x' has {x.shape[0]}; "
                "there must be one condition row per sample"
            )
    return Table(x, c)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path: Path, condition_columns: Sequence[str] | None) -> Table:
    name = path.name
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataFileError(f"cannot read {name} as a .csv file: it is not UTF-8 text") from None
    except OSError as err:
        raise DataFileError(f"cannot read {name}: {_first_line(err)}") from None
    try:
        lines = [(i + 1, row) for i, row in enumerate(csv.reader(io.StringIO(text))) if row]
    except csv.Error as err:
        raise DataFileError(f"cannot read {name} as a .csv file: {_first_line(err)}") from None
    if not lines:
        raise DataFileError(f"{name} is empty; it needs a header row and at least one data row")
    (_, header), body = lines[0], lines[1:]
    header = [h.strip() for h in header]
    if all(_is_number(h) for h in header):
        raise DataFileError(
            f"{name} has no header: its first line holds numbers; add a first line of column names"
        )
    for j, h in enumerate(header):
        if not h:
            raise DataFileError(f"column {j + 1} of {name} has no name in the header")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataFileError(f"{name} has repeated column names in its header: {', '.join(dupes)}")
    conds = list(condition_columns or [])
    missing = [col for col in conds if col not in header]
    if missing:
        raise DataFileError(
            f"condition column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
            f"not in the header of {name} (its columns: {', '.join(header)})"
        )
    features = [h for h in header if h not in conds]
    if not features:
        raise DataFileError(f"every column of {name} is a condition column; no features are left")
    if not body:
        raise DataFileError(f"{name} has a header but no data rows")
    for line, row in body:
        if len(row) != len(header):
            raise DataFileError(
                f"line {line} of {name} has {len(row)} fields but the header has {len(header)}"
            )
    columns = {}
    for j, h in enumerate(header):
        cells = [row[j].strip() for _, row in body]
        try:
            columns[h] = np.array(cells, dtype=np.float64)
        except ValueError:
            k = next(k for k, v in enumerate(cells) if not _is_number(v))
            raise DataFileError(
                f"column {h!r} of {name} is not numeric (line {body[k][0]}: {cells[k]!r})"
            ) from None
    x = np.stack([columns[h] for h in features], axis=1)
    c = np.stack([columns[h] for h in conds], axis=1) if conds else None
    return Table(x, c, features, conds or None)


def read_data_file(path: str | Path, condition_columns: Sequence[str] | None = None) -> Table:
    """Read a ``.npy``, ``.npz`` or ``.csv`` file of samples and check every value.

    Arguments:
        path: the file.
        condition_columns: CSV column names that hold conditions (CSV only).

    Returns the :class:`Table`; rows with a NaN or infinite value, or one beyond the float32
    range, raise a :class:`DataFileError` naming them (0-based rows, or CSV line numbers).
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise DataFileError(
            f"cannot read {path.name}: unknown extension {ext or '(none)'!r}; "
            f"use one of {', '.join(EXTENSIONS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if condition_columns and ext != ".csv":
        raise DataFileError(
            f"condition columns name columns of a .csv header; {path.name} is {ext} "
            "(an .npz file gives conditions as its array 'c')"
        )
    if ext == ".csv":
        table = _read_csv(path, condition_columns)
    else:
        table = _read_npz(path) if ext == ".npz" else _read_npy(path)
    if table.x.shape[0] == 0 or table.x.shape[1] == 0:
        raise DataFileError(f"{path.name} is empty: its data have shape {tuple(table.x.shape)}")
    limit = float(np.finfo(np.float32).max)
    for array, what in ((table.x, "values"), (table.c, "condition values")):
        if array is None:
            continue
        bad = np.flatnonzero(~(np.abs(array) <= limit).all(axis=1))  # NaN compares False
        if len(bad):
            raise DataFileError(
                f"{path.name} has NaN or infinite {what} (or beyond float32) on "
                f"{_row_list(bad, ext == '.csv')}; remove or fix those rows"
            )
    return table


def split_sizes(n: int, val: float | int, test: float | int, name: str = "the data") -> tuple[int, int, int]:
    """Rows in the (train, val, test) splits of ``n`` rows. A float in ``[0, 1)`` is a fraction
    of ``n`` (rounded), an integer a number of rows; training gets the rest."""
    sizes = []
    for label, value in (("val", val), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataFileError(f"data.options.{label} must be a fraction or a row count, got {value!r}")
        if isinstance(value, float):
            if not 0.0 <= value < 1.0:
                raise DataFileError(
                    f"data.options.{label}={value} must be a fraction in [0, 1) or an integer row count"
                )
            sizes.append(int(round(value * n)))
        else:
            if value < 0:
                raise DataFileError(f"data.options.{label} must be >= 0 rows, got {value}")
            sizes.append(value)
    n_val, n_test = sizes
    counts = {"training": n - n_val - n_test, "validation": n_val, "test": n_test}
    short = [k for k, v in counts.items() if v < MIN_ROWS[k]]
    if short:
        got = ", ".join(f"{v} {k}" for k, v in counts.items())
        need = ", ".join(f"{v} {k}" for k, v in MIN_ROWS.items())
        raise DataFileError(
            f"too few rows in {name}: its {n} rows split into {got}; at least {need} rows are needed "
            "(change data.options.val / data.options.test)"
        )
    return counts["training"], n_val, n_test


def check_file_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` completed with :data:`FILE_OPTIONS` and checked; ``condition_columns`` given
    as ``"a,b"`` becomes ``["a", "b"]``."""
    unknown = sorted(set(options) - set(FILE_OPTIONS))
    if unknown:
        raise DataFileError(
            f"unknown data.options {', '.join(unknown)} for data.name=file; valid: {', '.join(FILE_OPTIONS)}"
        )
    o = {**FILE_OPTIONS, **options}
    if not o["path"]:
        raise DataFileError("data.name=file needs data.options.path (or use `freeflows train --data PATH`)")
    if not isinstance(o["standardize"], bool):
        raise DataFileError(f"data.options.standardize must be true or false, got {o['standardize']!r}")
    cols = o["condition_columns"]
    if isinstance(cols, str):
        o["condition_columns"] = [v.strip() for v in cols.split(",") if v.strip()]
    elif cols is not None and not (isinstance(cols, list) and all(isinstance(v, str) for v in cols)):
        raise DataFileError(f"data.options.condition_columns must be a list of column names, got {cols!r}")
    o["condition_columns"] = o["condition_columns"] or None
    return o


def check_unchanged(path: Path, sha256: str | None) -> None:
    """Raise one line if the file at ``path`` is gone or its SHA-256 is no longer ``sha256``."""
    if not path.is_file():
        raise FileNotFoundError(f"the run's data file {path} no longer exists; restore it to use this run")
    if sha256 is not None and file_sha256(path) != sha256:
        raise DataFileError(
            f"the run's data file {path} has changed since the run was made "
            f"(sha256 {file_sha256(path)[:12]}..., the run has {sha256[:12]}...); restore the original file"
        )


def load_file(options: dict[str, Any], seed: int = 0) -> DataSet:
    """The data set of a user's file, as ``data.options`` (see :data:`FILE_OPTIONS`) describe it.

    Arguments:
        options: ``path`` (the file), ``sha256`` (its digest when the run was made; the file must
            still match), ``condition_columns`` (CSV), ``val`` and ``test`` (split fractions or row
            counts), ``standardize`` (z-score features and conditions with training statistics).
        seed: shuffles the rows before they are cut into splits.

    The splits hold the file's values as float32. ``meta`` holds ``path``, the CSV column names
    (``feature_names``, ``condition_names``) and, with ``standardize``, the fitted
    ``standardizer`` and ``condition_standardizer``; then ``wrap_model`` is set.
    """
    o = check_file_options(options)
    path = Path(o["path"])
    if o["sha256"] is not None and path.suffix.lower() in EXTENSIONS:
        check_unchanged(path, o["sha256"])
    table = read_data_file(path, o["condition_columns"])
    n = table.x.shape[0]
    n_train, n_val, n_test = split_sizes(n, o["val"], o["test"], path.name)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    x = torch.from_numpy(table.x[perm]).float()
    c = None if table.c is None else torch.from_numpy(table.c[perm]).float()
    cuts = ((0, n_train), (n_train, n_train + n_val), (n_train + n_val, n))
    train, val, test = (Split(x[a:b], None if c is None else c[a:b]) for a, b in cuts)
    meta: dict[str, Any] = {
        "path": str(path),
        "feature_names": table.feature_names,
        "condition_names": table.condition_names,
    }
    wrap = None
    if o["standardize"]:
        x_std = _fit(table.x[perm[:n_train]])
        c_std = None if table.c is None else _fit(table.c[perm[:n_train]])
        meta.update(standardizer=x_std, condition_standardizer=c_std)

        def wrap(model: torch.nn.Module) -> torch.nn.Module:
            return StandardizedModel(model, x_std, c_std)

    return DataSet(
        name=path.name,
        train=train,
        val=val,
        test=test,
        event_shape=(x.shape[1],),
        condition_dim=None if c is None else c.shape[1],
        wrap_model=wrap,
        meta=meta,
    )


def _fit(v: np.ndarray) -> Standardizer:
    """A float32 :class:`Standardizer` whose statistics are computed in float64."""
    fitted = Standardizer.fit(torch.from_numpy(v))
    return Standardizer(fitted.mean.float(), fitted.std.float())


def _names(names: Sequence[str]) -> str:
    return ", ".join(map(repr, names))


def _by_name(
    table_names: list[str], wanted: list[str], array: np.ndarray, name: str, what: str
) -> np.ndarray:
    """The columns of ``array`` (named ``table_names``) in the order of ``wanted``."""
    missing = [w for w in wanted if w not in table_names]
    if missing:
        raise DataFileError(
            f"{name} lacks the run's {what} column{'s' if len(missing) > 1 else ''} {_names(missing)} "
            f"(its columns: {', '.join(table_names)})"
        )
    extra = [t for t in table_names if t not in wanted]
    if extra:
        raise DataFileError(
            f"{name} has column{'s' if len(extra) > 1 else ''} {_names(extra)} that the run was not "
            f"trained on (its {what} columns: {', '.join(wanted)})"
        )
    return array[:, [table_names.index(w) for w in wanted]]


def read_rows_for(
    data: DataSet, path: str | Path, condition_columns: str | Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows of a file to score with a model of ``data``: float32 ``x [N, *event]`` and ``c``.

    A ``.csv`` file of a run trained on a ``.csv`` file must have the same columns (in any
    order); its condition columns are the run's unless ``condition_columns`` names others. For
    every other combination the number of features (and of conditions) must match the run's.
    """
    path = Path(path)
    if isinstance(condition_columns, str):
        condition_columns = [v.strip() for v in condition_columns.split(",") if v.strip()]
    features, conds = data.meta.get("feature_names"), data.meta.get("condition_names")
    is_csv = path.suffix.lower() == ".csv"
    if is_csv and condition_columns is None and conds:
        condition_columns = conds
    table = read_data_file(path, condition_columns)
    x, c = table.x, table.c
    if table.feature_names is not None and features is not None:
        x = _by_name(table.feature_names, features, x, path.name, "feature")
        if c is not None and table.condition_names is not None and conds:
            c = _by_name(table.condition_names, conds, c, path.name, "condition")
    width = int(np.prod(data.event_shape))
    if x.shape[1] != width:
        raise DataFileError(
            f"{path.name} has {x.shape[1]} feature columns per row but the run's model takes {width}"
        )
    if data.condition_dim is None and c is not None:
        raise DataFileError(f"{path.name} gives conditions, but the run's model is unconditional")
    if data.condition_dim is not None:
        if c is None:
            where = "condition columns of a .csv (--condition-columns)" if is_csv else "array 'c' of an .npz"
            raise DataFileError(
                f"the run's model is conditional ({data.condition_dim} numbers per row); "
                f"{path.name} gives none: pass them as the {where}"
            )
        if c.shape[1] != data.condition_dim:
            raise DataFileError(
                f"{path.name} has {c.shape[1]} condition values per row but the run's model takes "
                f"{data.condition_dim}"
            )
    x_t = torch.from_numpy(x).float().reshape(-1, *data.event_shape)
    return x_t, None if c is None else torch.from_numpy(c).float()
