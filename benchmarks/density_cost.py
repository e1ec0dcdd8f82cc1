"""Cost of the free-form flow's normalised log-density against the papers' formula, side by side.

For each trained run given (``freeflows train ... --out RUN``), on the first ``--rows`` rows of
its test split, under ``torch.no_grad`` and one thread, this times

* ``log_prob(x)``: the normalised density of the decoder's draws (root solve g(z*) = x from
  f(x), then log p_Z(z*) - log|det J_g(z*)|), and
* ``log_prob(x, variant="paper")``: log p_Z(f(x)) - log|det J_g(f(x))| (one Jacobian, not
  normalised),

interleaved (``--repeats`` rounds, the order alternating), with the process's CPU time
(``time.process_time``). It reports the median of each and the ratio of the medians, the rows
whose solve did not converge, and the mean absolute difference of the two values on the data.
Writes ``<out>/density_cost.json`` and ``density_cost.md``.

    python benchmarks/density_cost.py RUN [RUN ...] --rows 2000 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from freeflows.runner.train import load_run


def _cpu_seconds(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def measure(run: Path, rows: int, repeats: int) -> dict:
    cfg, data, model = load_run(run)
    model.eval()
    x = data.test.x[:rows]
    c = None if data.test.c is None else data.test.c[:rows]
    variants = {
        "normalised": lambda: model.log_prob(x, c),
        "paper": lambda: model.log_prob(x, c, variant="paper"),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        values = {k: fn() for k, fn in variants.items()}  # warm-up, and the values
        for r in range(repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for k in order:
                times[k].append(_cpu_seconds(variants[k]))
    unsolved = torch.isnan(values["normalised"])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "run": str(run),
        "data": cfg["data"]["name"],
        "dim": int(x[0].numel()),
        "rows": int(x.shape[0]),
        "repeats": repeats,
        "cpu_seconds_normalised": med["normalised"],
        "cpu_seconds_paper": med["paper"],
        "ratio": med["normalised"] / med["paper"],
        "unsolved": int(unsolved.sum()),
        "mean_abs_difference": float((values["normalised"] - values["paper"])[~unsolved].abs().mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories of trained free-form flows")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [measure(run, args.rows, args.repeats) for run in args.runs]
    for row in rows:
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "rows": rows}
    (args.out / "density_cost.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| data | D | test rows | normalised / paper (CPU time) | unsolved rows "
        "| mean abs difference [nats] |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['dim']} | {r['rows']} | {r['ratio']:.2f}× | {r['unsolved']} "
            f"| {r['mean_abs_difference']:.4f} |"
        )
    (args.out / "density_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
