r"""QM9: 130,831 small organic molecules (H, C, N, O, F; at most 29 atoms) with 3-D geometries.

**Source.** The PyPI wheel ``qm9pack`` (MIT licence) ships the QM9 data set of Ramakrishnan et
al. (2014) as CSV files inside its package directory: for every molecule its QM9 index, the
elements, the B3LYP/6-31G(2df,p) coordinates in ångström and a SMILES string. It holds the
130,831 molecules that remain after removing the 3,054 whose relaxed geometry does not match
their graph. Nothing is downloaded: install the wheel with ``pip install freeflows[molecules]``.

**Cache.** The CSV files (about 230 MB) are converted once into a compact ``.npz`` file,
written atomically (a temporary file, then :func:`os.replace`). It lives in ``cache`` when
given, else in the directory named by the environment variable ``FREEFLOWS_CACHE``, else in
``~/.cache/freeflows``, as ``qm9.npz``. A cache that cannot be read, or whose content is not
what this module writes, is rebuilt from ``qm9pack`` (and is an error when ``qm9pack`` is
missing).

**Splits** follow EDM (Hoogeboom et al., 2022, arXiv:2203.17003), which takes them from
Cormorant (Anderson et al., 2019, arXiv:1906.04015): with the molecules in increasing QM9 index
and :math:`M = 130831`,

.. code-block:: python

    np.random.seed(0); perm = np.random.permutation(M)
    train, val, test = perm[:100000], perm[100000:117748], perm[117748:]

that is 100,000 training, :math:`M - 100000 - \lfloor 0.1 M \rfloor = 17748` validation and
:math:`\lfloor 0.1 M \rfloor = 13083` test molecules, each split in the permutation's order.
The excluded set of 3,054 molecules is assumed to be the same as Cormorant's.

**Slice.** ``freeflows/data/files/qm9_slice.npz`` (package data) holds the first 300 molecules
of the training split and the first 100 of the test split, so that tests and examples run
without ``qm9pack`` (:func:`qm9_slice`; made by ``scripts/make_qm9_slice.py``).

Positions are as shipped (not centred); :meth:`Molecules.centered` removes each molecule's
mean position over its real atoms.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

ELEMENTS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS = (1, 6, 7, 8, 9)
MAX_ATOMS = 29

N_MOLECULES = 130_831
N_TRAIN = 100_000
N_TEST = N_MOLECULES // 10  # 13083
N_VAL = N_MOLECULES - N_TRAIN - N_TEST  # 17748
SPLITS = ("train", "val", "test")

SLICE_FILE = Path(__file__).parent / "files" / "qm9_slice.npz"
CACHE_NAME = "qm9.npz"
_CACHE_VERSION = 1
_CSV_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
_INSTALL_HINT = "pip install freeflows[molecules]"

__all__ = [
    "ATOMIC_NUMBERS",
    "ELEMENTS",
    "MAX_ATOMS",
    "Molecules",
    "atom_count_histogram",
    "cache_path",
    "load_qm9",
    "qm9_slice",
    "split_indices",
]


@dataclass
class Molecules:
    """A padded batch of molecules.

    Attributes:
        positions: ``float32 [M, 29, 3]``, ångström; padding rows are zero.
        types: ``int64 [M, 29]``, index into :data:`ELEMENTS`, ``-1`` for padding. Real atoms
            come first in every row.
        smiles: one SMILES string per molecule, as shipped with the data.

    Indexing with an integer, a slice, a list, or a 1-D integer or boolean array or tensor gives
    another :class:`Molecules` (an integer, also a numpy or torch scalar, gives a batch of one).

    Example:
        >>> mols = qm9_slice()
        >>> len(mols), tuple(mols.positions.shape)
        (400, (400, 29, 3))
        >>> first = mols[:2]
        >>> first.n_atoms.tolist() == first.mask.sum(1).tolist()
        True
    """

    positions: Tensor
    types: Tensor
    smiles: list[str]

    def __post_init__(self) -> None:
        p, t = self.positions, self.types
        if p.dim() != 3 or p.shape[1:] != (MAX_ATOMS, 3):
            raise ValueError(f"positions must have shape [M, {MAX_ATOMS}, 3], got {tuple(p.shape)}")
        if t.shape != p.shape[:2]:
            raise ValueError(f"types must have shape {tuple(p.shape[:2])}, got {tuple(t.shape)}")
        if t.dtype != torch.int64:
            raise ValueError(f"types must be int64, got {t.dtype}")
        if len(self.smiles) != p.shape[0]:
            raise ValueError(f"{len(self.smiles)} SMILES for {p.shape[0]} molecules")

    @property
    def n_atoms(self) -> Tensor:
        """Number of atoms of each molecule, ``int64 [M]``."""
        return self.mask.sum(dim=1)

    @property
    def mask(self) -> Tensor:
        """``True`` for real atoms, ``bool [M, 29]``."""
        return self.types >= 0

    def centered(self) -> Molecules:
        """The same molecules with each one's mean position over its real atoms at the origin."""
        from ..geometry import center

        m = self.mask.unsqueeze(-1).to(self.positions.dtype)
        pos = center(self.positions.flatten(1), *self.positions.shape[1:], mask=self.mask)
        return Molecules(pos.view_as(self.positions) * m, self.types, self.smiles)

    def __len__(self) -> int:
        """Number of molecules."""
        return self.positions.shape[0]

    def __getitem__(self, idx: Any) -> Molecules:
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, slice):
            rows = range(len(self))[idx]
            return Molecules(self.positions[idx], self.types[idx], [self.smiles[i] for i in rows])
        index = torch.as_tensor(np.asarray(idx) if not isinstance(idx, Tensor) else idx)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise ValueError(f"a boolean index must have shape ({len(self)},), got {tuple(index.shape)}")
            index = index.nonzero().squeeze(1)
        if index.dim() == 0:  # a numpy or torch integer scalar
            index = index.reshape(1)
        if index.dim() != 1 or (index.numel() and index.is_floating_point()):
            raise ValueError(f"index molecules with integers, slices or a 1-D index, got {idx!r}")
        index = index.long()
        rows = index.tolist()
        return Molecules(self.positions[index], self.types[index], [self.smiles[i] for i in rows])


def split_indices(split: str, n: int = N_MOLECULES) -> np.ndarray:
    """Row numbers (molecules in increasing QM9 index) of ``split``, EDM's rule (module docstring).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        n: number of molecules (130,831 for QM9).

    Example:
        >>> [len(split_indices(s)) for s in ("train", "val", "test")]
        [100000, 17748, 13083]
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n_test = n // 10
    n_val = n - N_TRAIN - n_test
    if n_val < 0:
        raise ValueError(f"need at least {N_TRAIN} molecules to split, got {n}")
    perm = np.random.RandomState(0).permutation(n)  # == np.random.seed(0); np.random.permutation(n)
    bounds = {"train": (0, N_TRAIN), "val": (N_TRAIN, N_TRAIN + n_val), "test": (N_TRAIN + n_val, n)}
    lo, hi = bounds[split]
    return perm[lo:hi]


def cache_path(cache: Path | str | None = None) -> Path:
    """Where the converted QM9 file lives: ``cache`` (a directory or a ``.npz`` path), else
    ``$FREEFLOWS_CACHE/qm9.npz``, else ``~/.cache/freeflows/qm9.npz``.

    Args:
        cache: a directory, or the path of the ``.npz`` file itself.

    Example:
        >>> cache_path("/data/qm9").as_posix(), cache_path("/tmp/my.npz").as_posix()
        ('/data/qm9/qm9.npz', '/tmp/my.npz')
    """
    if cache is not None:
        cache = Path(cache).expanduser()
        return cache if cache.suffix == ".npz" else cache / CACHE_NAME
    root = os.environ.get("FREEFLOWS_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "freeflows"
    return base / CACHE_NAME


def _qm9pack_data_dir() -> Path:
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"QM9 needs the qm9pack package: {_INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [f for f in _CSV_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"qm9pack at {folder} lacks {', '.join(missing)}; reinstall: {_INSTALL_HINT}")
    return folder


def _parse_list(text: str) -> list[str]:
    return [s for s in text.replace("[", " ").replace("]", " ").replace("'", " ").replace(",", " ").split()]


def _convert(folder: Path) -> dict[str, np.ndarray]:
    """Read qm9pack's CSV files into the cache's flat arrays (molecules in increasing QM9 index)."""
    try:
        import pandas as pd
    except ImportError as e:
        raise ModuleNotFoundError(f"converting QM9 needs pandas: {_INSTALL_HINT}") from e
    cols = ["Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang"]
    df = pd.concat([pd.read_csv(folder / f, usecols=cols) for f in _CSV_FILES], ignore_index=True)
    df = df.sort_values("Index", kind="stable").reset_index(drop=True)
    code = {e: i for i, e in enumerate(ELEMENTS)}
    types = np.array([code[e] for s in df["Elements"] for e in _parse_list(s)], dtype=np.int8)
    coords = np.array([float(v) for s in df["XYZ_Ang"] for v in _parse_list(s)], dtype=np.float32)
    n_atoms = df["N_atoms"].to_numpy(np.int64)
    if types.size != n_atoms.sum() or coords.size != 3 * n_atoms.sum():
        raise ValueError(f"qm9pack's CSV files in {folder} disagree with their N_atoms column")
    smiles = "\n".join(df["SMILES"].astype(str))
    return {
        "version": np.array(_CACHE_VERSION),
        "index": df["Index"].to_numpy(np.int32),
        "n_atoms": n_atoms.astype(np.int8),
        "types": types,
        "positions": coords.reshape(-1, 3),
        "smiles": np.frombuffer(smiles.encode(), dtype=np.uint8),
    }


def _write_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a cache need not be
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_flat(path: Path, expect: int | None) -> dict[str, np.ndarray]:
    """The flat arrays of a file written by :func:`_write_atomic`; ValueError if it is not one."""
    keys = ("version", "index", "n_atoms", "types", "positions", "smiles")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable QM9 file ({type(e).__name__}: {e})") from e
    n = arrays["n_atoms"].astype(np.int64)
    problems = []
    if int(arrays["version"]) != _CACHE_VERSION:
        problems.append(f"version {int(arrays['version'])}, expected {_CACHE_VERSION}")
    if expect is not None and n.size != expect:
        problems.append(f"{n.size} molecules, expected {expect}")
    if arrays["index"].shape != n.shape or (n < 1).any() or (n > MAX_ATOMS).any():
        problems.append("bad atom counts")
    elif arrays["types"].shape != (n.sum(),) or arrays["positions"].shape != (n.sum(), 3):
        problems.append("atom arrays do not match the atom counts")
    if problems:
        raise ValueError(f"{path} is not a valid QM9 file: {'; '.join(problems)}")
    return arrays


def _to_molecules(arrays: dict[str, np.ndarray], rows: np.ndarray) -> Molecules:
    n = arrays["n_atoms"].astype(np.int64)
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    smiles_all = arrays["smiles"].tobytes().decode().split("\n")
    if len(smiles_all) != n.size:
        raise ValueError(f"{n.size} molecules but {len(smiles_all)} SMILES in the QM9 file")
    rows = np.asarray(rows, dtype=np.int64)
    m = rows.size
    slot = np.arange(MAX_ATOMS)
    real = slot[None, :] < n[rows, None]  # [m, 29]
    atom = (start[rows, None] + slot[None, :])[real]
    positions = np.zeros((m, MAX_ATOMS, 3), dtype=np.float32)
    types = np.full((m, MAX_ATOMS), -1, dtype=np.int64)
    positions[real] = arrays["positions"][atom]
    types[real] = arrays["types"][atom]
    if (types[real] < 0).any() or (types[real] >= len(ELEMENTS)).any():
        raise ValueError("the QM9 file holds atom types outside H, C, N, O, F")
    return Molecules(torch.from_numpy(positions), torch.from_numpy(types), [smiles_all[i] for i in rows])


def _load_cache(path: Path) -> dict[str, np.ndarray]:
    if path.is_file():
        try:
            return _read_flat(path, N_MOLECULES)
        except ValueError as e:
            if importlib.util.find_spec("qm9pack") is None:
                raise ValueError(f"{e}; delete it, or install qm9pack ({_INSTALL_HINT}) to rebuild it") from e
    arrays = _convert(_qm9pack_data_dir())
    if arrays["n_atoms"].size != N_MOLECULES:
        raise ValueError(f"qm9pack holds {arrays['n_atoms'].size} molecules, expected {N_MOLECULES}")
    _write_atomic(path, arrays)
    return arrays


def load_qm9(split: str, cache: Path | str | None = None) -> Molecules:
    """One split of QM9 (EDM's split; see the module docstring), converting ``qm9pack`` once.

    Args:
        split: ``"train"`` (100,000), ``"val"`` (17,748) or ``"test"`` (13,083).
        cache: directory (or ``.npz`` path) of the converted file; default
            ``$FREEFLOWS_CACHE`` or ``~/.cache/freeflows``.

    Returns:
        The split's molecules, in the order of EDM's permutation.

    Raises:
        ValueError: for an unknown split, or an unreadable cache that cannot be rebuilt.
        ModuleNotFoundError: when the cache is missing and ``qm9pack`` is not installed.

    Example:
        >>> test = load_qm9("test")  # doctest: +SKIP
        >>> len(test), test.smiles[0]  # doctest: +SKIP
        (13083, 'CCCC(O)C(C)(C)C')
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    arrays = _load_cache(cache_path(cache))
    return _to_molecules(arrays, split_indices(split))


def qm9_slice(split: str = "all") -> Molecules:
    """The small slice of QM9 shipped with freeflows (no ``qm9pack`` needed).

    Args:
        split: ``"train"`` (the first 300 molecules of the training split), ``"test"`` (the
            first 100 of the test split) or ``"all"`` (those 400, training ones first).

    Example:
        >>> [len(qm9_slice(s)) for s in ("train", "test", "all")]
        [300, 100, 400]
    """
    choices = {"train", "test", "all"}
    if split not in choices:
        raise ValueError(f"split must be one of {sorted(choices)}, got {split!r}")
    arrays = _read_flat(SLICE_FILE, None)
    with np.load(SLICE_FILE, allow_pickle=False) as f:
        n_train = int(f["n_train"])
    n = arrays["n_atoms"].size
    rows = {"train": np.arange(n_train), "test": np.arange(n_train, n), "all": np.arange(n)}[split]
    return _to_molecules(arrays, rows)


def atom_count_histogram(mols: Molecules) -> Tensor:
    """Share of molecules with each number of atoms, ``float64 [30]`` (index = atom count).

    Example:
        >>> h = atom_count_histogram(qm9_slice())
        >>> h.shape, round(float(h.sum()), 6), float(h[0])
        (torch.Size([30]), 1.0, 0.0)
    """
    if len(mols) == 0:
        raise ValueError("atom_count_histogram needs at least one molecule")
    counts = torch.bincount(mols.n_atoms, minlength=MAX_ATOMS + 1).to(torch.float64)
    return counts / counts.sum()
