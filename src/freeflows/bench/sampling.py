"""Sampling throughput: every model untrained, and trained CNFs against a free-form flow.

**Untrained** (``sampling.json`` and ``.md``): every model kind at D = 2 and 16, and the free-form
flow with 20 refinement steps (:mod:`freeflows.inversion`; random weights, so that all 20 steps
run). Each model is built with its default options by the same builder the CLI uses
(:func:`freeflows.experiments.registry.build_model`) and timed drawing ``N`` samples per call under
``torch.no_grad()``. Rows of ``sampling_speed.json`` (the trained section) and
``autoregressive_timing.json`` (classic flows), if present in the results directory, are appended
with their source.

**Trained** (``sampling_speed.json`` and ``.md``): a CNF, an RNODE-regularised CNF and a
free-form flow trained on the same two-moons data (seed 0; the data section of ``cnf-two-moons``):

* ``cnf``: preset ``cnf-two-moons`` (FFJORD; dopri5; sampling at rtol = atol = 1e-5);
* ``rnode``: preset ``rnode-two-moons`` (the same CNF plus kinetic and Jacobian penalties);
* ``fff``: preset ``two-moons`` (free-form flow; a sample is one decoder pass).

The runs are in ``runs/bench/cnf-two-moons``, ``runs/bench/rnode-two-moons`` and
``runs/bench/fff-two-moons``: finished runs there are reused, missing ones are trained there first
(about 10 minutes each on one thread). ``--runs CNF_DIR RNODE_DIR FFF_DIR`` uses other finished
runs. The section measures

* **samples per second**: ``model.sample(10000)``, 21 repeats in which the three models run
  interleaved; the median, min and max. The FFF speed-up is the ratio of the medians and, less
  sensitive to load that changes between repeats, the median of the per-repeat ratios of times
  ("paired", with its interquartile range);
* **NFE per sample**: for the CNFs, the function evaluations of one sampling solve (each acts on
  the whole batch, so this is also the network passes that each sample needs); for the
  free-form flow, 1 decoder pass;
* **test NLL**: each run's ``metrics.json``; the runs must share the test set.

Both sections run single-threaded and time the process's CPU time. ``--quick`` draws fewer
samples and trains the three presets for a few steps in a temporary directory;
``--untrained-only`` skips the trained section.

    freeflows bench sampling [--quick]
    python -m freeflows.bench.sampling --runs CNF_DIR RNODE_DIR FFF_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import common

NAME = "sampling"
#: Rows: model kinds with their default options, plus named variants ``row -> (kind, options)``.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fff, 20 refine steps": ("fff", {"sample_refine_steps": 20}),
}
MODELS = ("fff", *VARIANTS, "realnvp", "maf", "iaf", "glow", "nice", "planar", "cnf")
DIMS = (2, 16)
N = 4096
OTHER_FILES = ("sampling_speed.json", "autoregressive_timing.json")

#: The trained section: ``key: (preset, run directory)``; finished runs there are reused.
TRAINED_NAME = "sampling_speed"
TRAINED = {
    "cnf": ("cnf-two-moons", "runs/bench/cnf-two-moons"),
    "rnode": ("rnode-two-moons", "runs/bench/rnode-two-moons"),
    "fff": ("two-moons", "runs/bench/fff-two-moons"),
}
LABELS = {
    "cnf": "CNF (FFJORD, dopri5)",
    "rnode": "CNF + RNODE (kinetic + Jacobian)",
    "fff": "free-form flow",
}
#: The CNFs sample with dopri5 at rtol = atol = SAMPLE_TOL.
SAMPLE_TOL = 1e-5
TRAINED_BATCH = 10000
TRAINED_REPEATS = 21
SEED = 0


def sampler(kind: str, dim: int, n: int) -> Callable[[], Any]:
    """A call that draws ``n`` samples under ``torch.no_grad()`` from a model built with the registry's
    defaults (seed 0); a variant with refinement steps gets random weights so that every step runs.

    Args:
        kind: a model kind, or a row name of :data:`VARIANTS`.
        dim: the data dimension D.
        n: samples per call.
    """
    from ..experiments.registry import build_model

    base, options = VARIANTS.get(kind, (kind, {}))
    torch.manual_seed(0)
    model = build_model({"kind": base, base: options}, (dim,), None).eval()
    if options.get("sample_refine_steps"):
        # An untrained ResNet is exactly the identity, so f(g(z)) = z and the refinement would stop
        # at once. Random weights (the timing of a pass does not depend on their values) make it
        # run all its steps, as it does on a trained model whose decoder inverts only roughly.
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.3 / max(1, param.shape[-1]) ** 0.5)

    def draw() -> None:
        with torch.no_grad():
            model.sample(n)

    return draw


def collected(out_dir: Path) -> list[dict[str, Any]]:
    """Sampling rows of the other benchmarks' result files, as ``{model, D, samples_per_s,
    source, note}``; files that are absent or in an unknown format are skipped."""
    rows: list[dict[str, Any]] = []
    path = out_dir / "sampling_speed.json"
    if path.exists():
        data = json.loads(path.read_text())
        for name, m in (data.get("models") or {}).items():
            if isinstance(m, dict) and "samples_per_second" in m:
                note = f"trained on two moons, batch {data.get('batch')}"
                if m.get("model_options", {}).get("solver"):
                    note += f", {m['model_options']['solver']}"
                rows.append(
                    {
                        "model": name,
                        "D": 2,
                        "samples_per_s": m["samples_per_second"],
                        "source": path.name,
                        "note": note,
                    }
                )
    path = out_dir / "autoregressive_timing.json"
    if path.exists():
        data = json.loads(path.read_text())
        batch = (data.get("settings") or {}).get("batch")
        clock = "CPU time" if data.get("clock") == common.CLOCK else "thread CPU time"
        for r in data.get("rows", []):
            if batch and r.get("sample_seconds"):
                rows.append(
                    {
                        "model": r["kind"],
                        "D": r["dim"],
                        "samples_per_s": batch / r["sample_seconds"],
                        "source": path.name,
                        "note": f"untrained, batch {batch}, {clock}",
                    }
                )
    return rows


def trained_runs(quick: bool, tmp: str | Path, runs: Sequence[str | Path] | None = None) -> dict[str, Path]:
    """The run directories of the trained section: ``runs`` if given, else :data:`TRAINED`'s,
    each reused if finished and trained otherwise (in ``tmp`` for a quick run). All three train
    on the data section of ``cnf-two-moons``, with seed :data:`SEED`.

    Args:
        quick: train for a few steps in ``tmp`` (:data:`common.QUICK_TRAIN_OVERRIDES`).
        tmp: a directory for the quick runs.
        runs: three finished run directories (CNF, RNODE CNF, free-form flow), or ``None``.
    """
    if runs is not None:
        if len(runs) != len(TRAINED):
            raise ValueError(f"give {len(TRAINED)} run directories ({', '.join(TRAINED)}), got {len(runs)}")
        return {key: Path(r) for key, r in zip(TRAINED, runs, strict=True)}
    from ..experiments.config import load_config

    quick_overrides = common.QUICK_TRAIN_OVERRIDES if quick else ()
    data = load_config(TRAINED["cnf"][0], [*quick_overrides])["data"]
    overrides = [f"seed={SEED}", *(f"data.{k}={data[k]}" for k in ("name", "n_train", "n_val", "n_test"))]
    return {
        key: common.trained_run(preset, Path(tmp) / key if quick else path, overrides, quick=quick)
        for key, (preset, path) in TRAINED.items()
    }


def load_trained(runs: dict[str, Path]) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """The models of finished runs (CNFs set to sample at :data:`SAMPLE_TOL`) and what each run
    records: config, training steps and time, parameters, test NLL.

    Args:
        runs: ``{key: run directory}``.

    Raises:
        ValueError: if the runs do not share a test set (data name, ``n_test``, seed).
    """
    from ..runner.train import load_run

    models, info, test_sets = {}, {}, {}
    for key, run_dir in runs.items():
        cfg, _, model = load_run(run_dir)
        test_sets[key] = ({k: cfg["data"][k] for k in ("name", "n_test")}, cfg["seed"])
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
        kind = cfg["model"]["kind"]
        if kind == "cnf":
            model.rtol = model.atol = SAMPLE_TOL
        models[key] = model
        info[key] = {
            "run_dir": str(run_dir),
            "kind": kind,
            "data": cfg["data"],
            "seed": cfg["seed"],
            "model_options": cfg["model"][kind],
            "steps": metrics.get("steps"),
            "train_seconds": metrics.get("train_seconds"),
            "n_params": metrics.get("n_params"),
            "test_nll": metrics["test_nll"],
            "test_nll_stderr": metrics.get("test_nll_stderr"),
            **({"test_nll_paper": metrics["test_nll_paper"]} if "test_nll_paper" in metrics else {}),
        }
    first = next(iter(test_sets.values()))
    if any(v != first for v in test_sets.values()):
        raise ValueError(f"the runs do not share a test set (data name, n_test, seed): {test_sets}")
    return models, info


def nfe_per_sample(model: nn.Module, batch: int, seed: int = SEED) -> int:
    """Function evaluations of one sampling solve of a CNF (1, one decoder pass, for any model
    without an NFE counter).

    Args:
        model: the model.
        batch: samples drawn.
        seed: seed of the draw.
    """
    if not hasattr(model, "reset_nfe"):
        return 1
    model.reset_nfe()
    with torch.no_grad():
        model.sample(batch, generator=torch.Generator().manual_seed(seed))
    return int(model.nfe_sample)


def compare(
    models: dict[str, nn.Module], batch: int, repeats: int, seed: int = SEED
) -> dict[str, dict[str, Any]]:
    """Sampling rates of models side by side, and the speed-up of the one named ``"fff"``.

    Args:
        models: ``{key: model}``, one of them under ``"fff"``.
        batch: samples per call.
        repeats: interleaved timed repeats, after one warm-up call of each.
        seed: seed of every draw.

    Returns:
        Per key: ``samples_per_second`` (median), its ``_min`` and ``_max``, the CPU ``seconds``
        of every repeat, ``nfe_per_sample``, ``fff_speedup`` (ratio of median rates) and
        ``fff_speedup_paired`` (median of per-repeat ratios of times) with its
        ``fff_speedup_paired_quartiles``.
    """
    if "fff" not in models:
        raise ValueError(f"compare needs a model named 'fff', got {', '.join(models)}")

    def draw(model: nn.Module) -> Callable[[], Any]:
        def fn() -> None:
            with torch.no_grad():
                model.sample(batch, generator=torch.Generator().manual_seed(seed))

        return fn

    nfe = {key: nfe_per_sample(model, batch, seed) for key, model in models.items()}
    times = common.interleaved({key: draw(model) for key, model in models.items()}, repeats, warmup=1)
    fff_rate = batch / common.median(times["fff"])
    out = {}
    for key in models:
        rates = [batch / t for t in times[key]]
        per_repeat = [t / f for t, f in zip(times[key], times["fff"], strict=True)]
        quartiles = statistics.quantiles(per_repeat, n=4) if len(per_repeat) > 1 else per_repeat * 3
        rate = batch / common.median(times[key])
        out[key] = {
            "samples_per_second": rate,
            "samples_per_second_min": min(rates),
            "samples_per_second_max": max(rates),
            "seconds": times[key],
            "nfe_per_sample": nfe[key],
            "fff_speedup": fff_rate / rate,
            "fff_speedup_paired": common.paired_ratio(times[key], times["fff"]),
            "fff_speedup_paired_quartiles": [quartiles[0], quartiles[2]],
        }
    return out


def run_trained(
    out_dir: str = str(common.DEFAULT_OUT), quick: bool = False, runs: Sequence[str | Path] | None = None
) -> dict[str, Any]:
    """The trained section: sample the three trained models side by side; write
    ``sampling_speed.json`` and ``.md``.

    Args:
        out_dir: results directory.
        quick: train for a few steps in a temporary directory; 1000 samples, 3 repeats.
        runs: three finished run directories (CNF, RNODE CNF, free-form flow), or ``None`` for
            :data:`TRAINED`'s, reused or trained.

    Returns:
        The JSON payload, with its Markdown table under ``"markdown"``.
    """
    common.setup()
    env_start = common.environment()
    batch, repeats = (1000, 3) if quick else (TRAINED_BATCH, TRAINED_REPEATS)
    with tempfile.TemporaryDirectory(prefix="freeflows-bench-") as tmp:
        models, info = load_trained(trained_runs(quick, tmp, runs))
    common.setup()  # training sets the thread count of its config
    for key, measured in compare(models, batch, repeats).items():
        info[key].update(measured)
    command = f"freeflows bench {NAME}" + (" --quick" if quick else "")
    if runs is not None:
        command = f"python -m freeflows.bench.{NAME} --runs " + " ".join(map(str, runs))
    payload: dict[str, Any] = {
        "benchmark": "sampling speed, two moons",
        "quick": quick,
        "clock": common.CLOCK,
        "seed": SEED,
        "batch": batch,
        "repeats": repeats,
        "threads": 1,
        "cnf_sampling_solver": f"dopri5, rtol = atol = {SAMPLE_TOL:g}",
        "environment_start": env_start,
        "environment_end": common.environment(),
        "torch": torch.__version__,
        "command": command,
        "models": info,
    }
    payload["markdown"] = trained_markdown(payload)
    common.write(out_dir, TRAINED_NAME, payload, "# Sampling speed\n\n" + payload["markdown"])
    print(payload["markdown"])
    print(f"wrote {Path(out_dir) / TRAINED_NAME}.json and .md", flush=True)
    return payload


def trained_markdown(result: dict[str, Any]) -> str:
    """The trained section's table: test NLL, training, sampling rate, NFE and FFF speed-up.

    Args:
        result: the payload of :func:`run_trained`.
    """

    def num(x: float | None, spec: str) -> str:
        return "–" if x is None else format(x, spec)

    clock = "CPU time" if result.get("clock") == common.CLOCK else "wall time"
    lines = [
        f"Two moons (seed {result['seed']}), sampling batch {result['batch']}, 1 CPU thread, "
        f"median of {result['repeats']} interleaved repeats ({clock}).",
        "",
        "| model | test NLL (nats) | train steps | train s | samples / s (median) | min–max | "
        "NFE / sample | FFF speed-up | paired speed-up (IQR) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in result["models"].items():
        q = row["fff_speedup_paired_quartiles"]
        lines.append(
            f"| {LABELS.get(key, key)} | {row['test_nll']:.3f} ± {num(row['test_nll_stderr'], '.3f')} "
            f"| {row['steps']} | {num(row['train_seconds'], '.0f')} | {row['samples_per_second']:.0f} | "
            f"{row['samples_per_second_min']:.0f}–{row['samples_per_second_max']:.0f} | "
            f"{row['nfe_per_sample']} | {row['fff_speedup']:.1f}× | {row['fff_speedup_paired']:.1f}× "
            f"({q[0]:.1f}–{q[1]:.1f}) |"
        )
    return "\n".join(lines) + "\n"


def run(
    out_dir: str = str(common.DEFAULT_OUT),
    quick: bool = False,
    runs: Sequence[str | Path] | None = None,
    untrained_only: bool = False,
) -> dict[str, Any]:
    """Both sections: the trained one (:func:`run_trained`, unless ``untrained_only``), then the
    untrained one, which collects the trained rows; writes ``sampling.json`` and ``.md``.

    Args:
        out_dir: results directory.
        quick: fewer samples and repeats; the trained section trains for a few steps.
        runs: three finished run directories for the trained section, or ``None``.
        untrained_only: skip the trained section.

    Returns:
        The untrained section's JSON payload, with its Markdown table under ``"markdown"``.
    """
    if not untrained_only:
        run_trained(out_dir, quick, runs)
    common.setup()
    env_start = common.environment()
    n = 512 if quick else N
    rows = []
    for dim in DIMS:
        fns, errors = {}, {}
        for kind in MODELS:
            try:
                fn = sampler(kind, dim, n)
                fn()
                fns[kind] = fn
            except Exception as err:  # noqa: BLE001 - recorded in the table
                errors[kind] = f"{type(err).__name__}: {err}"[:200]
        t = common.interleaved(fns, 3 if quick else 10, warmup=1)
        for kind in MODELS:
            row = {"model": kind, "D": dim, "n": n, "loadavg": [round(x, 2) for x in os.getloadavg()]}
            if kind in t:
                row["samples_per_s"] = n / common.median(t[kind])
            else:
                row["error"] = errors[kind]
            rows.append(row)
            print(row, flush=True)
    payload = {
        "benchmark": NAME,
        "quick": quick,
        "clock": common.CLOCK,
        "environment_start": env_start,
        "environment_end": common.environment(),
        "rows": rows,
        "collected": collected(Path(out_dir)),
        "trained_results": None if untrained_only else f"{TRAINED_NAME}.json",
    }
    payload["markdown"] = markdown(payload)
    return common.write(out_dir, NAME, payload, payload["markdown"])


def markdown(p: dict[str, Any]) -> str:
    """The untrained section's table, and the rows collected from the other result files.

    Args:
        p: the payload of :func:`run`.
    """
    by = {(r["model"], r["D"]): r for r in p["rows"]}

    def cell(kind: str, dim: int) -> str:
        r = by.get((kind, dim))
        if r is None:
            return "–"
        return common.fmt(r["samples_per_s"]) if "samples_per_s" in r else "error: " + r["error"][:60]

    rows = [[kind] + [cell(kind, d) for d in DIMS] for kind in MODELS]
    e0, e1 = p["environment_start"], p["environment_end"]
    text = (
        "### Sampling throughput (untrained, default options)\n\n"
        f"Samples per second drawing {p['rows'][0]['n']} at a time, `torch.no_grad()`, "
        f"`torch.set_num_threads(1)`, CPU time, load average {e0['loadavg'][0]} at start, "
        f"{e1['loadavg'][0]} at end.\n\n"
        + common.table(["model"] + [f"D = {d} [samples/s]" for d in DIMS], rows)
    )
    if p["collected"]:
        text += "\n\nCollected from the other benchmarks' result files:\n\n" + common.table(
            ["model", "D", "samples/s", "source", "note"],
            [
                [r["model"], r["D"], common.fmt(r["samples_per_s"]), r["source"], r["note"]]
                for r in sorted(p["collected"], key=lambda r: (r["D"], r["model"]))
            ],
        )
    return text


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runs",
        nargs=3,
        metavar=("CNF_DIR", "RNODE_DIR", "FFF_DIR"),
        help="finished runs for the trained section (default: runs/bench/..., reused or trained)",
    )
    p.add_argument("--untrained-only", action="store_true", help="skip the trained section")


if __name__ == "__main__":
    common.main(run, __doc__, _options)
