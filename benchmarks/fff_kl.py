"""KL(p‖q) to the truth of the preset free-form flow, with zuko's NSF and MAF beside it, on the
data sets whose density is known, after a longer budget of equal steps.

This is :mod:`peer_toys` with other defaults: data sets ``gaussian-mixture-1d`` and
``eight-gaussians`` (``--presets``), models ``fff nsf maf``, the equal-steps budget only
(``--steps``, default 10000), output ``<out>/fff_kl.{json,md}``. Every model is trained by the
same loop on the same batches (see :mod:`peer_baseline`); the free-form flow is reported with its
normalised ``log_prob`` and with the paper's (not normalised) value.

    python benchmarks/fff_kl.py --presets gaussian-mixture-1d --steps 10000 --seeds 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import peer_toys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["gaussian-mixture-1d", "eight-gaussians"])
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--models", nargs="+", default=["fff", "nsf", "maf"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=peer_toys.ROOT / "results")
    args = p.parse_args(argv)
    known = [d for d in args.presets if d in peer_toys.DATASETS and d != "two-moons"]
    if len(known) != len(args.presets):
        p.error(f"--presets: choose among gaussian-mixture-1d and eight-gaussians, got {args.presets}")
    return peer_toys.main(
        [
            "--datasets",
            *args.presets,
            "--models",
            *args.models,
            "--budgets",
            "steps",
            "--steps",
            str(args.steps),
            "--seeds",
            *map(str, args.seeds),
            "--workers",
            str(args.workers),
            "--out",
            str(args.out),
            "--name",
            "fff_kl",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
