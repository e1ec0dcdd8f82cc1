"""Write ``src/freeflows/data/files/qm9_slice.npz``: a small QM9 slice shipped for tests.

The slice holds the first 300 molecules of EDM's training split and the first 100 of its test
split (in the split's permutation order; see ``freeflows.data.qm9``), in the same flat format as
the converted cache, plus ``n_train`` (= 300). Needs ``qm9pack`` (``pip install
freeflows[molecules]``). Deterministic: rerunning it gives the same arrays.

    python scripts/make_qm9_slice.py [--train 300] [--test 100] [--out PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from freeflows.data import qm9


def slice_arrays(flat: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    n = flat["n_atoms"].astype(np.int64)
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    atoms = np.concatenate([np.arange(start[r], start[r] + n[r]) for r in rows])
    smiles = flat["smiles"].tobytes().decode().split("\n")
    return {
        "version": flat["version"],
        "index": flat["index"][rows],
        "n_atoms": flat["n_atoms"][rows],
        "types": flat["types"][atoms],
        "positions": flat["positions"][atoms],
        "smiles": np.frombuffer("\n".join(smiles[r] for r in rows).encode(), dtype=np.uint8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--out", type=Path, default=qm9.SLICE_FILE)
    parser.add_argument("--cache", type=Path, default=None, help="the converted QM9 file's directory")
    args = parser.parse_args()
    flat = qm9._load_cache(qm9.cache_path(args.cache))
    rows = np.concatenate([qm9.split_indices("train")[: args.train], qm9.split_indices("test")[: args.test]])
    arrays = slice_arrays(flat, rows)
    arrays["n_train"] = np.array(args.train)
    np.savez_compressed(args.out, **arrays)
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {args.train} train + {args.test} test molecules, {size} bytes")


if __name__ == "__main__":
    main()
