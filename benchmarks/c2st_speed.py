"""Speed of C2ST: ``c2st_many`` (the ``"batched"`` classifier, all pairs and folds trained at once)
against one ``c2st(..., classifier="sklearn")`` call per pair (sbibm's protocol), side by side in
one run, on 1 thread (torch's and numpy's BLAS), with CPU time (``time.process_time``).

Two sets of 10 pairs, 10,000 against 10,000 samples each:

* ``two_moons-2d``: two moons (noise 0.1) against two moons with noise 0.1 + 0.02 i, i = 0..9;
* ``gauss-5d``: standard normal against a normal whose mean moves by 0.05 i in one coordinate.

Both paths use seed 1: the same folds and the same random draws (the batched classifier draws as
scikit-learn does), so their scores differ only through float32 rounding. Writes
``benchmarks/results/c2st_speed.json`` and ``.md``.

    python benchmarks/c2st_speed.py [--pairs 10] [--n 10000] [--sets two_moons-2d gauss-5d]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from threadpoolctl import threadpool_limits

from freeflows.eval.c2st import c2st, c2st_many

RESULTS = Path(__file__).parent / "results"


def two_moons(n: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` points of scikit-learn's two-moons shape: half circles, Gaussian noise ``noise``."""
    angle = math.pi * torch.rand(n, generator=generator)
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    return torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=generator)


def pairs(name: str, count: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``count`` pairs of the set ``name`` (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        if name == "two_moons-2d":
            out.append((two_moons(n, 0.1, g), two_moons(n, 0.1 + 0.02 * i, g)))
        elif name == "gauss-5d":
            x, y = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
            y[:, 0] += 0.05 * i
            out.append((x, y))
        else:
            raise ValueError(name)
    return out


def measure(name: str, count: int, n: int) -> dict:
    """CPU and wall seconds and scores of both paths on the set ``name``."""
    data = pairs(name, count, n)
    cpu, wall = time.process_time(), time.perf_counter()
    batched = c2st_many(data, seed=1)
    batched_cpu, batched_wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{name}: c2st_many {batched_cpu:.1f} s CPU", flush=True)
    reference, sklearn_cpu, sklearn_wall = [], 0.0, 0.0
    for x, y in data:
        cpu, wall = time.process_time(), time.perf_counter()
        reference.append(c2st(x, y, seed=1, classifier="sklearn"))
        sklearn_cpu, sklearn_wall = (
            sklearn_cpu + time.process_time() - cpu,
            sklearn_wall + time.perf_counter() - wall,
        )
        i = len(reference) - 1
        print(f"  sklearn pair {i + 1}: {reference[i]:.4f} (batched {batched[i]:.4f})", flush=True)
    diffs = np.array(batched) - np.array(reference)
    return {
        "set": name,
        "pairs": count,
        "samples_per_side": n,
        "dim": data[0][0].shape[1],
        "batched_scores": batched,
        "sklearn_scores": reference,
        "batched_cpu_s": batched_cpu,
        "sklearn_cpu_s": sklearn_cpu,
        "batched_wall_s": batched_wall,
        "sklearn_wall_s": sklearn_wall,
        "speedup_cpu": sklearn_cpu / batched_cpu,
        "mean_abs_diff": float(np.abs(diffs).mean()),
        "max_abs_diff": float(np.abs(diffs).max()),
        "mean_diff": float(diffs.mean()),
    }


def markdown(rows: list[dict], machine: str, note: str = "") -> str:
    lines = [
        "# C2ST speed: c2st_many (batched) against sklearn, pair by pair",
        "",
        f"{machine}. CPU seconds (`time.process_time`), both measured in one run, one after the",
        "other. Seed 1 for both: the same folds and random draws, so the scores differ only through",
        "float32 rounding (numpy's and torch's sums), which grows over long trainings (here in 5-D).",
        *([note] if note else []),
        "",
        "| set | pairs | samples/side | d | sklearn CPU s | c2st_many CPU s | speed-up | "
        "mean abs diff | max abs diff | mean diff (batched − sklearn) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {r['pairs']} | {r['samples_per_side']} | {r['dim']} | "
            f"{r['sklearn_cpu_s']:.1f} | {r['batched_cpu_s']:.1f} | {r['speedup_cpu']:.1f}× | "
            f"{r['mean_abs_diff']:.4f} | {r['max_abs_diff']:.4f} | {r['mean_diff']:+.4f} |"
        )
    lines += ["", "Scores per pair (sklearn / batched):", ""]
    for r in rows:
        per = ", ".join(
            f"{a:.4f}/{b:.4f}" for a, b in zip(r["sklearn_scores"], r["batched_scores"], strict=True)
        )
        lines.append(f"- {r['set']}: {per}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--sets", nargs="+", default=["two_moons-2d", "gauss-5d"])
    parser.add_argument("--name", default="c2st_speed")
    parser.add_argument("--note", default="", help="a line on the conditions, e.g. the machine's load")
    args = parser.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(limits=1)  # numpy's BLAS too (scikit-learn's matmuls)
    machine = (
        f"{platform.machine()}, 1 thread (torch and BLAS), torch {torch.__version__}, "
        f"scikit-learn {sklearn.__version__}"
    )
    rows = [measure(name, args.pairs, args.n) for name in args.sets]
    RESULTS.mkdir(exist_ok=True)
    result = {"machine": machine, "note": args.note, "load_average": os.getloadavg(), "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, machine, args.note))
    print(markdown(rows, machine, args.note))


if __name__ == "__main__":
    main()
