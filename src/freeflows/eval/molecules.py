r"""Molecule metrics of EDM (Hoogeboom et al., 2022, arXiv:2203.17003): stability, validity,
uniqueness and novelty of 3-D molecules given as atom types and positions.

**Bonds from distances.** Every pair of atoms :math:`(a, b)` at distance :math:`d` (in pm) gets
the highest bond order whose rule holds, with :math:`\ell_k(a, b)` the typical length of a bond
of order :math:`k` between their elements (:data:`BOND_LENGTHS`) and margins
:math:`(m_1, m_2, m_3) = (10, 5, 3)` pm:

.. math:: \text{order}(a, b) = \begin{cases}
    3 & d < \ell_3 + m_3 \\ 2 & d < \ell_2 + m_2 \\ 1 & d < \ell_1 + m_1 \\ 0 & \text{otherwise}
    \end{cases}

(a rule only applies when the table has that bond; every double bond is shorter than the
single one, every triple shorter than the double).

**Stability.** An atom is stable when the orders of its bonds sum to its valency
(:data:`VALENCIES`: H 1, C 4, N 3, O 2, F 1); a molecule is stable when all its atoms are. *Atom
stability* is the share of stable atoms among all atoms of all molecules; *molecule stability*
the share of stable molecules.

**Validity, uniqueness, novelty** (need RDKit). A molecule is built from its atoms and the bonds
above, without charges, and sanitised (RDKit adds implicit hydrogens where an atom has too few
bonds, so an under-bonded molecule can be valid; one with too many is not). Its largest
fragment's canonical SMILES (hydrogens removed, no stereochemistry) is the molecule's SMILES.

* *validity*: share of molecules that sanitise;
* *uniqueness*: share of distinct SMILES among the valid ones;
* *novelty*: share of the distinct valid SMILES that are not in the training set, whose SMILES
  are canonicalised the same way.

Uniqueness and novelty are 0 when there is nothing to count (no valid molecule).
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.qm9 import ELEMENTS, cache_path, load_qm9

#: Typical bond lengths in pm, by bond order, for pairs of ``ELEMENTS`` (symmetric).
BOND_LENGTHS: dict[int, dict[tuple[str, str], float]] = {
    1: {
        ("H", "H"): 74, ("H", "C"): 109, ("H", "N"): 101, ("H", "O"): 96, ("H", "F"): 92,
        ("C", "C"): 154, ("C", "N"): 147, ("C", "O"): 143, ("C", "F"): 135,
        ("N", "N"): 145, ("N", "O"): 140, ("N", "F"): 136,
        ("O", "O"): 148, ("O", "F"): 142,
        ("F", "F"): 142,
    },
    2: {
        ("C", "C"): 134, ("C", "N"): 129, ("C", "O"): 120,
        ("N", "N"): 125, ("N", "O"): 121,
        ("O", "O"): 121,
    },
    3: {("C", "C"): 120, ("C", "N"): 116, ("C", "O"): 113, ("N", "N"): 110},
}  # fmt: skip

#: Margins in pm added to the typical length of a single, double and triple bond.
MARGINS: dict[int, float] = {1: 10.0, 2: 5.0, 3: 3.0}

#: Number of bonds (sum of orders) of a stable atom.
VALENCIES: dict[str, int] = {"H": 1, "C": 4, "N": 3, "O": 2, "F": 1}

_CHUNK = 1024

__all__ = [
    "BOND_LENGTHS",
    "MARGINS",
    "VALENCIES",
    "atom_stability",
    "bond_orders",
    "bonds",
    "canonical_smiles",
    "molecule_metrics",
    "molecule_smiles",
    "molecule_stability",
    "novelty",
    "qm9_train_smiles",
    "stable_atoms",
    "uniqueness",
    "validity",
]


def _thresholds(order: int) -> Tensor:
    """``[5, 5]`` distance thresholds (pm) below which a pair has at least ``order``; -inf if none."""
    table = torch.full((len(ELEMENTS), len(ELEMENTS)), -math.inf, dtype=torch.float64)
    for (a, b), length in BOND_LENGTHS[order].items():
        i, j = ELEMENTS.index(a), ELEMENTS.index(b)
        table[i, j] = table[j, i] = length + MARGINS[order]
    return table


def _check(positions: Any, types: Any, mask: Any | None) -> tuple[Tensor, Tensor, Tensor]:
    positions = torch.as_tensor(positions).detach().to("cpu", torch.float64)
    types = torch.as_tensor(types).detach().to("cpu")
    if positions.dim() != 3 or positions.shape[-1] != 3:
        raise ValueError(f"positions must have shape [M, N, 3], got {tuple(positions.shape)}")
    if types.shape != positions.shape[:2]:
        raise ValueError(f"types must have shape {tuple(positions.shape[:2])}, got {tuple(types.shape)}")
    if types.is_floating_point() or types.dtype == torch.bool:
        raise ValueError(f"types must be integers (indices into {ELEMENTS}), got {types.dtype}")
    types = types.long()
    mask = types >= 0 if mask is None else torch.as_tensor(mask).detach().to("cpu", torch.bool)
    if mask.shape != types.shape:
        raise ValueError(f"mask must have shape {tuple(types.shape)}, got {tuple(mask.shape)}")
    bad = mask & ((types < 0) | (types >= len(ELEMENTS)))
    if bad.any():
        m, i = bad.nonzero()[0].tolist()
        raise ValueError(
            f"atom {i} of molecule {m} has type {int(types[m, i])}, not an index into {ELEMENTS}"
        )
    if not torch.isfinite(positions[mask]).all():
        raise ValueError("positions of real atoms must be finite")
    return positions, torch.where(mask, types, 0), mask


def bond_orders(positions: Any, types: Any, mask: Any | None = None) -> Tensor:
    """Bond order (0 to 3) of every pair of atoms, by the distance rule of the module docstring.

    Args:
        positions: ``[M, N, 3]`` in ångström.
        types: ``[M, N]`` integer index into ``ELEMENTS`` (``-1`` for padding).
        mask: ``bool [M, N]``, ``True`` for real atoms; default ``types >= 0``.

    Returns:
        ``int64 [M, N, N]``, symmetric, zero on the diagonal and for padding.

    Example:
        >>> pos = torch.tensor([[[0.0, 0.0, 0.0], [1.20, 0.0, 0.0], [9.0, 0.0, 0.0]]])
        >>> bond_orders(pos, torch.tensor([[1, 1, -1]]))[0].tolist()  # C#C at 1.20 Å
        [[0, 3, 0], [3, 0, 0], [0, 0, 0]]
    """
    positions, types, mask = _check(positions, types, mask)
    t1, t2, t3 = (_thresholds(k) for k in (1, 2, 3))
    out = torch.zeros(types.shape + types.shape[-1:], dtype=torch.int64)
    eye = torch.eye(types.shape[1], dtype=torch.bool)
    for lo in range(0, types.shape[0], _CHUNK):
        p, t, m = positions[lo : lo + _CHUNK], types[lo : lo + _CHUNK], mask[lo : lo + _CHUNK]
        d = 100.0 * (p.unsqueeze(2) - p.unsqueeze(1)).norm(dim=-1)  # pm
        a, b = t.unsqueeze(2), t.unsqueeze(1)
        order = (d < t1[a, b]).long() * (1 + (d < t2[a, b]).long() * (1 + (d < t3[a, b]).long()))
        pair = m.unsqueeze(2) & m.unsqueeze(1) & ~eye
        out[lo : lo + _CHUNK] = order * pair
    return out


def bonds(positions: Any, types: Any, mask: Any | None = None) -> list[tuple[Tensor, Tensor]]:
    """The bonds of each molecule: ``(pairs int64 [K, 2] with i < j, orders int64 [K])``.

    Args:
        positions: ``[M, N, 3]`` in ångström.
        types: ``[M, N]`` integer index into ``ELEMENTS`` (``-1`` for padding).
        mask: ``bool [M, N]``, ``True`` for real atoms; default ``types >= 0``.

    Example:
        >>> pos = torch.tensor([[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0]]])  # O-H at 0.96 Å
        >>> pairs, orders = bonds(pos, torch.tensor([[3, 0]]))[0]
        >>> pairs.tolist(), orders.tolist()
        ([[0, 1]], [1])
    """
    orders = bond_orders(positions, types, mask)
    out = []
    for o in orders:
        pairs = torch.triu(o, diagonal=1).nonzero()
        out.append((pairs, o[pairs[:, 0], pairs[:, 1]]))
    return out


def _stable_from_orders(orders: Tensor, types: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    valency = torch.tensor([VALENCIES[e] for e in ELEMENTS])[torch.where(mask, types, 0)]
    atoms = (orders.sum(-1) == valency) & mask
    return atoms, (atoms | ~mask).all(-1)


def stable_atoms(positions: Any, types: Any, mask: Any | None = None) -> tuple[Tensor, Tensor]:
    """Which atoms are stable (``bool [M, N]``, ``False`` for padding) and which molecules
    (``bool [M]``): the orders of an atom's bonds sum to its valency.

    Args:
        positions: ``[M, N, 3]`` in ångström.
        types: ``[M, N]`` integer index into ``ELEMENTS`` (``-1`` for padding).
        mask: ``bool [M, N]``, ``True`` for real atoms; default ``types >= 0``.

    Example:
        >>> pos = torch.tensor([[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0]]])  # O-H: O has one bond too few
        >>> atoms, mols = stable_atoms(pos, torch.tensor([[3, 0]]))
        >>> atoms.tolist(), mols.tolist()
        ([[False, True]], [False])
    """
    positions, types, mask = _check(positions, types, mask)
    return _stable_from_orders(bond_orders(positions, types, mask), types, mask)


def _atom_share(atoms: Tensor, mask: Tensor) -> float:
    return float(atoms.sum()) / max(int(mask.sum()), 1)


def _molecule_share(mols: Tensor) -> float:
    return float(mols.double().mean()) if mols.numel() else 0.0


def atom_stability(positions: Any, types: Any, mask: Any | None = None) -> float:
    """Share of stable atoms among all real atoms of all molecules (see :func:`stable_atoms`).

    Example:
        >>> pos = torch.tensor([[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0]]])
        >>> atom_stability(pos, torch.tensor([[3, 0]]))
        0.5
    """
    positions, types, mask = _check(positions, types, mask)
    return _atom_share(stable_atoms(positions, types, mask)[0], mask)


def molecule_stability(positions: Any, types: Any, mask: Any | None = None) -> float:
    """Share of molecules whose atoms are all stable (see :func:`stable_atoms`).

    Example:
        >>> pos = torch.tensor([[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0]]])
        >>> molecule_stability(pos, torch.tensor([[3, 0]]))
        0.0
    """
    return _molecule_share(stable_atoms(positions, types, mask)[1])


def _rdkit() -> Any:
    try:
        from rdkit import Chem, RDLogger
    except ImportError as e:
        raise ModuleNotFoundError(
            "validity, uniqueness and novelty need RDKit: pip install freeflows[molecules]"
        ) from e
    RDLogger.DisableLog("rdApp.*")
    return Chem


def canonical_smiles(smiles: str) -> str | None:
    """RDKit's canonical SMILES of ``smiles`` without stereochemistry, or ``None`` if unparsable.

    Example:
        >>> canonical_smiles("OCC")
        'CCO'
    """
    Chem = _rdkit()
    mol = Chem.MolFromSmiles(smiles)
    return None if mol is None else Chem.MolToSmiles(mol, isomericSmiles=False)


def molecule_smiles(positions: Any, types: Any, mask: Any | None = None) -> list[str | None]:
    """SMILES of each molecule's largest fragment, ``None`` where RDKit cannot sanitise it.

    Args:
        positions: ``[M, N, 3]`` in ångström.
        types: ``[M, N]`` integer index into ``ELEMENTS`` (``-1`` for padding).
        mask: ``bool [M, N]``, ``True`` for real atoms; default ``types >= 0``.

    Example:
        >>> pos = torch.tensor([[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0]]])  # O-H: RDKit adds the other H
        >>> molecule_smiles(pos, torch.tensor([[3, 0]]))
        ['O']
    """
    positions, types, mask = _check(positions, types, mask)
    return _smiles_from_orders(bond_orders(positions, types, mask), types, mask)


def _smiles_from_orders(orders: Tensor, types: Tensor, mask: Tensor) -> list[str | None]:
    Chem = _rdkit()
    kind = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    out: list[str | None] = []
    for t, m, o in zip(types, mask, orders, strict=True):
        idx = m.nonzero().squeeze(1)
        mol = Chem.RWMol()
        for e in t[idx].tolist():
            mol.AddAtom(Chem.Atom(ELEMENTS[e]))
        sub = o[idx][:, idx]
        for i, j in torch.triu(sub, diagonal=1).nonzero().tolist():
            mol.AddBond(i, j, kind[int(sub[i, j])])
        try:
            Chem.SanitizeMol(mol)
            frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=True)
            largest = max(frags, key=lambda f: f.GetNumAtoms(), default=mol)
            out.append(Chem.MolToSmiles(Chem.RemoveHs(largest), isomericSmiles=False))
        except (ValueError, RuntimeError):  # RDKit's sanitisation errors derive from ValueError
            out.append(None)
    return out


def validity(smiles: list[str | None]) -> float:
    """Share of molecules whose SMILES (from :func:`molecule_smiles`) exists.

    Example:
        >>> validity(["CCO", None, "C", "CCO"])
        0.75
    """
    return sum(s is not None for s in smiles) / len(smiles) if smiles else 0.0


def uniqueness(smiles: list[str | None]) -> float:
    """Share of distinct SMILES among the valid ones (0 without valid molecules).

    Example:
        >>> uniqueness(["CCO", None, "C", "CCO"])
        0.6666666666666666
    """
    valid = [s for s in smiles if s is not None]
    return len(set(valid)) / len(valid) if valid else 0.0


@functools.lru_cache(maxsize=4)
def _canonical_set(smiles: tuple[str, ...]) -> frozenset[str]:
    out = (canonical_smiles(s) for s in smiles)
    return frozenset(s for s in out if s is not None)


def novelty(smiles: list[str | None], train_smiles: Iterable[str]) -> float:
    """Share of the distinct valid SMILES not in ``train_smiles`` (canonicalised here, and
    remembered for the next call with the same strings; 0 without valid molecules).

    Args:
        smiles: from :func:`molecule_smiles`, ``None`` for invalid molecules.
        train_smiles: the training set's SMILES; a ``frozenset`` is taken as already canonical.

    Example:
        >>> novelty(["CCO", None, "C", "CCO"], train_smiles=["OCC"])
        0.5
    """
    unique = {s for s in smiles if s is not None}
    if not unique:
        return 0.0
    train = train_smiles if isinstance(train_smiles, frozenset) else _canonical_set(tuple(train_smiles))
    return len(unique - train) / len(unique)


@functools.lru_cache(maxsize=2)
def _train_smiles_cached(path: Path) -> frozenset[str]:
    if path.is_file():
        return frozenset(path.read_text().split("\n")) - {""}
    smiles = _canonical_set(tuple(load_qm9("train", path.parent).smiles))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(sorted(smiles)))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return smiles


def qm9_train_smiles(cache: Path | str | None = None) -> frozenset[str]:
    """Canonical SMILES (as :func:`canonical_smiles`) of QM9's training split, for novelty.

    Computed once from :func:`~freeflows.data.qm9.load_qm9` and kept next to the QM9 cache as
    ``qm9_train_smiles.txt`` (and in memory).

    Args:
        cache: the QM9 cache's directory (or ``.npz`` path); see :func:`~freeflows.data.qm9.cache_path`.

    Example:
        >>> train = qm9_train_smiles()  # doctest: +SKIP
        >>> len(train)  # distinct among 100,000  # doctest: +SKIP
        99953
    """
    return _train_smiles_cached(cache_path(cache).parent / "qm9_train_smiles.txt")


def molecule_metrics(
    positions: Any, types: Any, mask: Any | None = None, train_smiles: Iterable[str] | None = None
) -> dict[str, float]:
    """All of EDM's molecule metrics for a padded batch (see the module docstring).

    Args:
        positions: ``[M, N, 3]`` in ångström.
        types: ``[M, N]`` integer index into ``ELEMENTS`` (``-1`` for padding).
        mask: ``bool [M, N]``, ``True`` for real atoms; default ``types >= 0``.
        train_smiles: the training set's SMILES (any valid form, canonicalised here; a
            ``frozenset`` such as :func:`qm9_train_smiles` is taken as already canonical).
            Without it novelty is NaN.

    Returns:
        ``atom_stability``, ``molecule_stability``, ``validity``, ``uniqueness``, ``novelty``
        (fractions) and ``n_molecules``.

    Example:
        >>> pos = torch.tensor([[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0]]])
        >>> m = molecule_metrics(pos, torch.tensor([[3, 0]]), train_smiles=["C"])
        >>> m["atom_stability"], m["molecule_stability"], m["validity"], m["novelty"]
        (0.5, 0.0, 1.0, 1.0)
    """
    positions, types, mask = _check(positions, types, mask)
    orders = bond_orders(positions, types, mask)
    atoms, mols = _stable_from_orders(orders, types, mask)
    smiles = _smiles_from_orders(orders, types, mask)
    return {
        "atom_stability": _atom_share(atoms, mask),
        "molecule_stability": _molecule_share(mols),
        "validity": validity(smiles),
        "uniqueness": uniqueness(smiles),
        "novelty": math.nan if train_smiles is None else novelty(smiles, train_smiles),
        "n_molecules": float(len(smiles)),
    }
