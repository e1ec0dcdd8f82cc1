"""Shared helpers of the speed benchmarks: interleaved timing, medians, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = Path("benchmarks/results")


def setup(threads: int = 1) -> None:
    """All figures are single-threaded: ``torch.set_num_threads(threads)``."""
    torch.set_num_threads(threads)


def environment() -> dict[str, Any]:
    """What the numbers were measured on, including the load average at call time."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


#: The clock: CPU time of this process (``time.process_time``), not wall time. On a shared, loaded
#: machine the wall time of a single-threaded call also counts the time the scheduler gave to
#: other processes; the CPU time does not (it still sees cache and memory-bandwidth contention).
CLOCK = "process_time"


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, seed: int = 0, wall: bool = False
) -> dict[str, list[float]]:
    """Time every variant once per repeat, in a shuffled order per repeat, so that load noise hits
    all variants alike; returns seconds of CPU time (wall time if ``wall``) per call
    ``{name: [repeats]}``."""
    clock = time.perf_counter if wall else time.process_time
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    rng = random.Random(seed)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
    return times


def op_profile(fn: Callable[[], Any], calls: int = 3, top: int = 6) -> dict[str, Any]:
    """torch.profiler summary of ``fn`` (after one warm-up call): aten operator calls per call and
    the ``top`` aten operators by self CPU time, with their share of all aten self time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    aten = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in aten) or 1.0
    best = sorted(aten, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "aten_calls_per_step": sum(e.count for e in aten) / calls,
        "top_self_cpu": [
            {"op": e.key, "calls_per_step": e.count / calls, "share": round(e.self_cpu_time_total / total, 3)}
            for e in best
        ],
    }


def median(xs: list[float]) -> float:
    """The median of ``xs`` (``statistics.median``).

    Args:
        xs: times, or any numbers.
    """
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """Half the interquartile range relative to the median (a robust noise figure)."""
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / 2 / statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over repeats of the per-repeat ratio: both variants ran in the same repeat, close
    in time, so the ratio cancels most of the slow drift of the load."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def write(out_dir: str | Path, name: str, payload: dict[str, Any], markdown: str) -> dict[str, Any]:
    """Write a benchmark's result files ``<name>.json`` and ``<name>.md`` to ``out_dir`` (created if missing).

    Args:
        out_dir: the results directory.
        name: the benchmark's name, the files' stem.
        payload: the JSON payload.
        markdown: the Markdown report.

    Returns:
        ``payload``, unchanged.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    return payload


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table.

    Args:
        header: the column titles.
        rows: the cells of each row, written with ``str``.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 3) -> str:
    """A number for a table: ``–`` for NaN, no decimals from 100 on, else ``digits`` significant digits.

    Args:
        x: the number.
        digits: significant digits below 100.
    """
    if x != x:  # nan
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


#: Overrides of every run a benchmark trains: one thread, no progress bar.
TRAIN_OVERRIDES = ("trainer.threads=1", "trainer.progress_bar=false")
#: Overrides of the runs a ``--quick`` benchmark trains (in a temporary directory): a few steps on
#: small splits, no plots.
QUICK_TRAIN_OVERRIDES = (
    "trainer.max_steps=3",
    "trainer.batch_size=128",
    "trainer.val_batch_size=128",
    "trainer.plot=false",
    "data.n_train=512",
    "data.n_val=128",
    "data.n_test=256",
)


def trained_run(preset: str, run_dir: str | Path, overrides: Sequence[str] = (), quick: bool = False) -> Path:
    """The finished run in ``run_dir`` if there is one, else a run trained there from ``preset``.

    A finished run (one with ``metrics.json``) is reused when its model kind and data set are the
    preset's; anything else in ``run_dir`` is an error, so that no run is overwritten.

    Args:
        preset: the preset to train (``freeflows presets`` lists them).
        run_dir: the run directory to reuse or to train into.
        overrides: ``KEY=VALUE`` config overrides, after the preset's settings.
        quick: train for a few steps on small splits (:data:`QUICK_TRAIN_OVERRIDES`).

    Returns:
        ``run_dir``, holding a finished run.
    """
    from ..experiments.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(preset, [*TRAIN_OVERRIDES, *(QUICK_TRAIN_OVERRIDES if quick else ()), *overrides])
    if (run_dir / "metrics.json").is_file():
        from ..runner.train import read_run_config

        found = read_run_config(run_dir)
        for section, key in (("model", "kind"), ("data", "name")):
            if found[section][key] != cfg[section][key]:
                raise ValueError(
                    f"{run_dir} holds a run with {section}.{key} = {found[section][key]!r}, not the "
                    f"{preset!r} preset's {cfg[section][key]!r}: give another run directory"
                )
        print(f"reusing the run in {run_dir}", flush=True)
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(
            f"{run_dir} holds no finished run (no metrics.json): resume it with "
            f"`freeflows train --resume {run_dir}` or remove it"
        )
    from ..runner.train import train

    print(f"training {preset} -> {run_dir}", flush=True)
    train(cfg, run_dir)
    return run_dir


def main(
    run: Callable[..., dict[str, Any]],
    doc: str,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """The ``__main__`` of a benchmark module: ``--out DIR --quick`` and the module's own options.

    Args:
        run: the module's ``run(out_dir, quick, **options)``.
        doc: the module's docstring; its first line describes the command.
        options: adds the module's own arguments to the parser; each is passed to ``run`` as a
            keyword named by its ``dest``.
    """
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results directory (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="few repeats and sizes, for a smoke run")
    if options is not None:
        options(p)
    args = vars(p.parse_args())
    out, quick = args.pop("out"), args.pop("quick")
    try:
        result = run(out, quick=quick, **args)
    except (ValueError, FileNotFoundError) as err:  # a bad run directory: one line, no traceback
        p.exit(2, f"{p.prog}: error: {str(err).strip().splitlines()[0]}\n")
    print(result.get("markdown", json.dumps(result, indent=2)))
