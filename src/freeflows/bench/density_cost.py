"""Cost of the free-form flow's normalised log-density against the papers' formula, side by side.

On trained free-form flows, on the first 2000 rows of each run's test split, under
``torch.no_grad`` and one thread, this times

* ``log_prob(x)``: the normalised density of the decoder's draws (root solve g(z*) = x from
  f(x), then log p_Z(z*) - log|det J_g(z*)|), and
* ``log_prob(x, variant="paper")``: log p_Z(f(x)) - log|det J_g(f(x))| (one Jacobian, not
  normalised),

interleaved over 7 repeats, with the process's CPU time. It reports the median of each, the
median of the per-repeat ratios, the rows whose solve did not converge, and the mean absolute
difference of the two values on the data.

The runs are the ``two-moons`` and ``eight-gaussians`` presets with seed 0, in
``runs/two-moons-s0`` and ``runs/eight-gaussians-s0``: a finished run there is reused (as made by
``freeflows train two-moons --out runs/two-moons-s0``), otherwise the preset is trained there
first (about 6 minutes each on one thread). ``--runs RUN [RUN ...]`` times other finished runs
instead. ``--quick`` trains both presets for a few steps in a temporary directory and times 200
rows over 3 repeats. Writes ``<out>/density_cost.json`` and ``density_cost.md``.

    freeflows bench density_cost [--quick]
    python -m freeflows.bench.density_cost --runs RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import common

NAME = "density_cost"
#: The presets timed by default, and the run directory of each (reused when finished).
RUNS = {"two-moons": "runs/two-moons-s0", "eight-gaussians": "runs/eight-gaussians-s0"}
OVERRIDES = ("seed=0",)
ROWS = 2000
REPEATS = 7


def measure(model: nn.Module, x: Tensor, c: Tensor | None = None, repeats: int = REPEATS) -> dict[str, Any]:
    """Time a free-form flow's normalised ``log_prob`` against its paper variant on ``x``.

    Args:
        model: a free-form flow (its ``log_prob`` takes ``variant``).
        x: the rows to score.
        c: their conditions, or ``None``.
        repeats: interleaved timed repeats, after one warm-up call of each.

    Returns:
        The median CPU seconds of each (``cpu_seconds_normalised``, ``cpu_seconds_paper``), the
        median of the per-repeat ratios (``ratio``), the rows whose solve failed (``unsolved``)
        and the mean absolute difference of the two values on the solved rows.
    """
    model.eval()
    variants = {
        "normalised": lambda: model.log_prob(x, c),
        "paper": lambda: model.log_prob(x, c, variant="paper"),
    }
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows whose solve fails are NaN, with a warning
        values = {k: fn() for k, fn in variants.items()}
        times = common.interleaved(variants, repeats, warmup=0)
    unsolved = torch.isnan(values["normalised"])
    return {
        "dim": int(x[0].numel()),
        "rows": int(x.shape[0]),
        "repeats": repeats,
        "cpu_seconds_normalised": common.median(times["normalised"]),
        "cpu_seconds_paper": common.median(times["paper"]),
        "ratio": common.paired_ratio(times["normalised"], times["paper"]),
        "unsolved": int(unsolved.sum()),
        "mean_abs_difference": float((values["normalised"] - values["paper"])[~unsolved].abs().mean()),
    }


def measure_run(run_dir: str | Path, rows: int = ROWS, repeats: int = REPEATS) -> dict[str, Any]:
    """:func:`measure` on the first ``rows`` test rows of a finished run.

    Args:
        run_dir: a run directory of a trained free-form flow.
        rows: test rows to score.
        repeats: interleaved timed repeats.
    """
    from ..runner.train import load_run

    cfg, data, model = load_run(Path(run_dir))
    x = data.test.x[:rows]
    c = None if data.test.c is None else data.test.c[:rows]
    return {"run": str(run_dir), "data": cfg["data"]["name"], **measure(model, x, c, repeats)}


def run(
    out_dir: str = str(common.DEFAULT_OUT), quick: bool = False, runs: Sequence[str | Path] | None = None
) -> dict[str, Any]:
    """Time the normalised density against the paper variant on trained runs; write the files.

    Args:
        out_dir: results directory; ``density_cost.json`` and ``.md`` are written there.
        quick: train the presets for a few steps in a temporary directory; 200 rows, 3 repeats.
        runs: finished run directories of free-form flows to time; ``None``: the presets of
            :data:`RUNS`, reused or trained.

    Returns:
        The JSON payload, with its Markdown table under ``"markdown"``.
    """
    common.setup()
    env_start = common.environment()
    rows, repeats = (200, 3) if quick else (ROWS, REPEATS)
    with tempfile.TemporaryDirectory(prefix="freeflows-bench-") as tmp:
        if runs is None:
            dirs = [
                common.trained_run(preset, Path(tmp) / preset if quick else path, OVERRIDES, quick=quick)
                for preset, path in RUNS.items()
            ]
        else:
            dirs = [Path(r) for r in runs]
        results = []
        for run_dir in dirs:
            results.append(measure_run(run_dir, rows, repeats))
            print(results[-1], flush=True)
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "quick": quick,
        "clock": common.CLOCK,
        "torch": torch.__version__,
        "environment_start": env_start,
        "environment_end": common.environment(),
        "rows": results,
    }
    payload["markdown"] = markdown(payload)
    return common.write(out_dir, NAME, payload, payload["markdown"])


def markdown(result: dict[str, Any]) -> str:
    """The Markdown table: one row per run.

    Args:
        result: the payload of :func:`run`.
    """
    lines = [
        "| data | D | test rows | normalised / paper (CPU time) | unsolved rows "
        "| mean abs difference [nats] |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['data']} | {r['dim']} | {r['rows']} | {r['ratio']:.2f}× | {r['unsolved']} "
            f"| {r['mean_abs_difference']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runs", nargs="+", metavar="RUN", help="finished free-form runs to time (default: the presets)"
    )


if __name__ == "__main__":
    common.main(run, __doc__, _options)
