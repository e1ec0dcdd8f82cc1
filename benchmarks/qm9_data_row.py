"""EDM's molecule metrics on QM9 itself (the "data" row): checks the bond-length table.

EDM (Hoogeboom et al., 2022, arXiv:2203.17003, Table 2, QM9 with hydrogens) reports 99.0 % atom
stability and 95.2 % molecule stability for the data. This scores the first 10,000 molecules of
the test split and the whole test split (13,083) with ``freeflows.eval.molecules``: stability
(vectorised), RDKit validity, uniqueness, and novelty against the training split's SMILES. No
randomness: the split is EDM's fixed permutation (seed 0). Times are wall seconds on one thread.
Writes ``benchmarks/results/qm9_data_row.json`` and ``.md``.

    python benchmarks/qm9_data_row.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from freeflows.data.qm9 import cache_path, load_qm9
from freeflows.eval.molecules import molecule_metrics, qm9_train_smiles, stable_atoms

RESULTS = Path(__file__).parent / "results"
EDM = {"atom_stability": 0.990, "molecule_stability": 0.952}
KEYS = ("atom_stability", "molecule_stability", "validity", "uniqueness", "novelty")


def score(name: str, mols, train: frozenset[str]) -> dict:
    t = time.perf_counter()
    stable_atoms(mols.positions, mols.types, mols.mask)
    stability_s = time.perf_counter() - t
    t = time.perf_counter()
    metrics = molecule_metrics(mols.positions, mols.types, mols.mask, train_smiles=train)
    total_s = time.perf_counter() - t
    return {"rows": name, **metrics, "stability_seconds": stability_s, "all_metrics_seconds": total_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="the QM9 cache's directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t = time.perf_counter()
    test = load_qm9("test", args.cache)
    load_s = time.perf_counter() - t
    smiles_file_existed = (cache_path(args.cache).parent / "qm9_train_smiles.txt").is_file()
    t = time.perf_counter()
    train = qm9_train_smiles(args.cache)
    train_s = time.perf_counter() - t
    rows = [score("test[:10000]", test[:10000], train), score("test (all 13083)", test, train)]
    out = {
        "edm_data_row": EDM,
        "rows": rows,
        "load_test_seconds": load_s,
        "train_smiles_seconds": train_s,
        "train_smiles_from_file": smiles_file_existed,
        "n_train_smiles": len(train),
        "load_average": os.getloadavg()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qm9_data_row.json").write_text(json.dumps(out, indent=2) + "\n")
    how = "read from the cache directory" if smiles_file_existed else "canonicalised with RDKit, then cached"
    lines = [
        "# EDM's molecule metrics on QM9's test split (the data row)",
        "",
        "EDM's split (seed-0 permutation; test = its last 13,083 molecules), with hydrogens. "
        "Stability from `freeflows.eval.molecules` (bond lengths with margins 10/5/3 pm); validity, "
        "uniqueness and novelty (against the training split's "
        f"{len(train)} distinct canonical SMILES) with RDKit. One thread, wall seconds, "
        f"torch {torch.__version__}, {platform.machine()}.",
        "",
        "| molecules | atom stab. | mol. stab. | validity | uniqueness | novelty "
        "| stability s | all metrics s |",
        "|---|---|---|---|---|---|---|---|",
        "| EDM, QM9 data (Table 2) | 99.0 % | 95.2 % | | | | | |",
    ]
    for r in rows:
        pct = " | ".join(f"{100 * r[k]:.2f} %" for k in KEYS)
        secs = f"{r['stability_seconds']:.2f} | {r['all_metrics_seconds']:.1f}"
        lines.append(f"| {r['rows']} | {pct} | {secs} |")
    lines += [
        "",
        f"Loading the test split from the cache: {load_s:.1f} s; "
        f"the training SMILES set: {train_s:.1f} s ({how}).",
        f"Load average when it finished: {os.getloadavg()[0]:.1f} on 2 cores (other jobs running).",
    ]
    (RESULTS / "qm9_data_row.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
