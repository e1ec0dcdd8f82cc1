r"""QM9 as a data set of the tool: padded molecule events for the models of
:meth:`freeflows.FreeFormFlow.molecules` and :meth:`freeflows.CNF.molecules`.

Each molecule becomes one event ``[29, 3 + k]`` (:mod:`freeflows.point_clouds`): per atom its
position in ångström, centred over the molecule's atoms, and :math:`k = 6` feature channels of
:class:`~freeflows.point_clouds.AtomEncoding` (one-hot of H, C, N, O, F scaled by 0.25 and the
atomic number scaled by 0.1, as EDM scales them), padding zero. The condition ``c`` is the atom
count ``[M, 1]``. The feature channels are dequantised once, when the data set is made, by
uniform noise drawn with the data seed, so the model's density is a proper density of
continuous features; ``log_volume`` of the encoding turns it into a bound on the probability of
the discrete types (see :class:`~freeflows.point_clouds.AtomEncoding`).

``source``: ``"qm9"`` (EDM's splits, :func:`freeflows.data.qm9.load_qm9`, needs the
``qm9pack`` wheel or a converted cache; ``n_train``, ``n_val`` and ``n_test`` take the first
rows of each split) or ``"slice"`` (the 400 molecules shipped with freeflows: 300 training
molecules, of which the last ``n_val`` are held out for validation, and 100 test molecules).

``meta`` carries what evaluation and plots need: the encoding, the atom-count histogram of the
training molecules (from which generated molecules draw their size), the training SMILES (for
novelty), the test molecules' positions and types, and the evaluation sizes ``eval_samples``
(generated molecules scored with EDM's metrics) and ``nll_rows`` (test molecules whose exact
NLL is computed: each costs a few Jacobians of ``29 * 9`` columns).
"""

from __future__ import annotations

from typing import Any

import torch

from ..point_clouds import AtomEncoding
from .base import DataSet, Split

#: ``data.options`` of ``qm9`` and their defaults.
OPTIONS: dict[str, Any] = {"source": "qm9", "eval_samples": 10_000, "nll_rows": 100}


def atom_encoding() -> AtomEncoding:
    """The encoding of QM9's five elements (EDM's scales)."""
    from .qm9 import ATOMIC_NUMBERS, ELEMENTS

    return AtomEncoding(len(ELEMENTS), type_scale=0.25, atomic_numbers=ATOMIC_NUMBERS, number_scale=0.1)


def molecule_split(mols: Any, encoding: AtomEncoding, generator: torch.Generator) -> Split:
    """Events ``[M, 29, 3 + k]`` (centred, dequantised) and atom counts ``[M, 1]`` of molecules.

    Args:
        mols: :class:`freeflows.data.qm9.Molecules`.
        encoding: the feature encoding.
        generator: the dequantisation noise's generator.

    Returns:
        The split.
    """
    mols = mols.centered()
    h = encoding.encode(mols.types, dequantize=True, generator=generator)
    x = torch.cat([mols.positions.float(), h], dim=-1)
    return Split(x, mols.n_atoms.float().unsqueeze(1))


def load_qm9_events(
    n_train: int, n_val: int, n_test: int, seed: int = 0, **options: Any
) -> DataSet:
    """The ``qm9`` data set of the tool (see the module docstring).

    Args:
        n_train: training molecules (at most the split's size).
        n_val: validation molecules.
        n_test: test molecules.
        seed: seed of the dequantisation noise.
        options: ``source``, ``eval_samples``, ``nll_rows`` (:data:`OPTIONS`).

    Returns:
        The data set, ``kind="molecules"``.
    """
    from .qm9 import MAX_ATOMS, atom_count_histogram, load_qm9, qm9_slice

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"data.options {unknown} are not used by qm9; it takes {', '.join(OPTIONS)}")
    o = {**OPTIONS, **options}
    if o["source"] not in ("qm9", "slice"):
        raise ValueError(f"data.options.source must be qm9 or slice, got {o['source']!r}")
    for key, least in (("eval_samples", 0), ("nll_rows", 1)):
        if isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < least:
            raise ValueError(f"data.options.{key} must be an integer >= {least}, got {o[key]!r}")
    if o["source"] == "slice":
        pool = qm9_slice("train")
        if n_val >= len(pool):
            raise ValueError(f"the qm9 slice has {len(pool)} training molecules; n_val={n_val} leaves none")
        train, val, test = pool[: len(pool) - n_val][:n_train], pool[len(pool) - n_val :], qm9_slice("test")
    else:
        train, val, test = load_qm9("train")[:n_train], load_qm9("val")[:n_val], load_qm9("test")
    test = test[:n_test]
    encoding = atom_encoding()
    gen = torch.Generator().manual_seed(seed)
    splits = [molecule_split(m, encoding, gen) for m in (train, val, test)]
    meta = {
        "max_atoms": MAX_ATOMS,
        "n_dims": 3,
        "encoding": encoding,
        "count_histogram": atom_count_histogram(train),
        "train_smiles": list(train.smiles),
        "test_positions": test.centered().positions,
        "test_types": test.types,
        "eval_samples": o["eval_samples"],
        "nll_rows": o["nll_rows"],
    }
    return DataSet(
        "qm9", *splits, event_shape=(MAX_ATOMS, 3 + encoding.channels), condition_dim=1, kind="molecules",
        meta=meta,
    )
