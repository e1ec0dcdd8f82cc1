"""Sampling speed of a CNF, an RNODE-regularised CNF and a free-form flow, side by side.

All three models are trained through the runner (:func:`freeflows.runner.train.train`) on the same
data: two moons with the presets' sizes and seed ``--seed``. The models are

* ``cnf``: preset ``cnf-two-moons`` (FFJORD; dopri5; sampling at rtol = atol = 1e-5);
* ``rnode``: preset ``rnode-two-moons`` (the same CNF plus kinetic and Jacobian penalties);
* ``fff``: preset ``two-moons`` (free-form flow; a sample is one decoder pass).

``--reuse CNF_DIR RNODE_DIR FFF_DIR`` loads finished runs instead of training
(:func:`freeflows.runner.train.load_run`); ``--set KEY=VALUE`` overrides are applied to the
three configs when training (e.g. ``--set trainer.max_steps=100`` for a smoke run).

Measured, with ``torch.set_num_threads(1)`` and without gradients:

* **samples per second**: ``model.sample(--batch)``; ``--repeats`` rounds, each timing every model
  once in a rotated order (so that load on a shared machine hits all models alike); the median
  over rounds is reported, with the min and max. The FFF speed-up is the ratio of medians and,
  less sensitive to load that changes between rounds, the median over rounds of the per-round
  ratio of times ("paired", with its interquartile range);
* **NFE per sample**: for the CNFs, the function evaluations of one sampling solve (``nfe_sample``
  after ``reset_nfe``; each evaluation acts on the whole batch, so this is also the number of
  network passes that each sample needs); for the free-form flow, 1 decoder pass;
* **test NLL**: the exact test NLL of each run's ``metrics.json``. The script checks that all
  runs share the test set (the toy splits depend only on the seed and their own size); when it
  trains, all three also share the training set (the data section of ``cnf-two-moons``).

Writes ``benchmarks/results/sampling_speed.json`` and ``.md``::

    python benchmarks/sampling_speed.py --reuse runs/bench/cnf-two-moons \\
        runs/bench/rnode-two-moons runs/bench/fff-two-moons
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from freeflows.experiments.config import load_config
from freeflows.runner.train import load_run, train

RESULTS = Path(__file__).parent / "results"
MODELS = {"cnf": "cnf-two-moons", "rnode": "rnode-two-moons", "fff": "two-moons"}
LABELS = {
    "cnf": "CNF (FFJORD, dopri5)",
    "rnode": "CNF + RNODE (kinetic + Jacobian)",
    "fff": "free-form flow",
}
SAMPLE_TOL = 1e-5


def get_runs(args: argparse.Namespace) -> dict[str, Path]:
    """Train the three presets through the runner, all on the data section of ``cnf-two-moons``
    (the ``two-moons`` preset for the free-form flow may ask for a larger training set)."""
    if args.reuse:
        return dict(zip(MODELS, map(Path, args.reuse), strict=True))
    data = load_config(MODELS["cnf"], args.set)["data"]
    same_data = [f"data.{k}={data[k]}" for k in ("name", "n_train", "n_val", "n_test")]
    runs = {}
    for key, preset in MODELS.items():
        overrides = [f"seed={args.seed}", "trainer.threads=1", "trainer.progress_bar=false", *same_data]
        cfg = load_config(preset, [*overrides, *args.set])
        run_dir = Path(args.runs) / key
        print(f"training {key} ({preset}) -> {run_dir}", flush=True)
        train(cfg, run_dir)
        runs[key] = run_dir
    return runs


def load_models(runs: dict[str, Path]) -> tuple[dict, dict]:
    models, info = {}, {}
    data_cfgs = {}
    for key, run_dir in runs.items():
        cfg, _, model = load_run(run_dir)
        test_set = {k: cfg["data"][k] for k in ("name", "n_test")}
        data_cfgs[key] = (test_set, cfg["seed"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if cfg["model"]["kind"] == "cnf":
            model.rtol = model.atol = SAMPLE_TOL
        models[key] = model
        info[key] = {
            "run_dir": str(run_dir),
            "kind": cfg["model"]["kind"],
            "data": cfg["data"],
            "seed": cfg["seed"],
            "model_options": cfg["model"][cfg["model"]["kind"]],
            "steps": metrics.get("steps"),
            "train_seconds": metrics.get("train_seconds"),
            "n_params": metrics.get("n_params"),
            "test_nll": metrics["test_nll"],
            "test_nll_stderr": metrics.get("test_nll_stderr"),
        }
    first = next(iter(data_cfgs.values()))
    if any(v != first for v in data_cfgs.values()):
        raise SystemExit(f"the runs do not share a test set (data name, n_test, seed): {data_cfgs}")
    return models, info


def nfe_per_sample(model: torch.nn.Module, batch: int, seed: int) -> int:
    if not hasattr(model, "reset_nfe"):
        return 1  # one decoder pass
    model.reset_nfe()
    with torch.no_grad():
        model.sample(batch, generator=torch.Generator().manual_seed(seed))
    return int(model.nfe_sample)


def time_sampling(models: dict, batch: int, repeats: int, seed: int) -> dict[str, list[float]]:
    keys = list(models)
    times: dict[str, list[float]] = {k: [] for k in keys}
    with torch.no_grad():
        for key in keys:  # warm-up
            models[key].sample(batch, generator=torch.Generator().manual_seed(seed))
        for r in range(repeats):
            order = keys[r % len(keys) :] + keys[: r % len(keys)]
            for key in order:
                gen = torch.Generator().manual_seed(seed + r)
                t = time.perf_counter()
                models[key].sample(batch, generator=gen)
                times[key].append(time.perf_counter() - t)
    return times


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def markdown(result: dict) -> str:
    rows = result["models"]
    lines = [
        f"Two moons (seed {result['seed']}), sampling batch {result['batch']}, 1 CPU thread, "
        f"median of {result['repeats']} interleaved repeats.",
        "",
        "| model | test NLL (nats) | train steps | train s | samples / s (median) | min–max | "
        "NFE / sample | FFF speed-up | paired speed-up (IQR) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        lines.append(
            f"| {LABELS[key]} | {row['test_nll']:.3f} ± {row['test_nll_stderr']:.3f} | {row['steps']} | "
            f"{row['train_seconds']:.0f} | {row['samples_per_second']:.0f} | "
            f"{row['samples_per_second_min']:.0f}–{row['samples_per_second_max']:.0f} | "
            f"{row['nfe_per_sample']} | {row['fff_speedup']:.1f}× | {row['fff_speedup_paired']:.1f}× "
            f"({row['fff_speedup_paired_quartiles'][0]:.1f}–{row['fff_speedup_paired_quartiles'][1]:.1f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reuse", nargs=3, metavar=("CNF_DIR", "RNODE_DIR", "FFF_DIR"))
    p.add_argument("--runs", default="runs/sampling-speed", help="where to train when not reusing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--name", default="sampling_speed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    runs = get_runs(args)
    models, info = load_models(runs)
    nfe = {k: nfe_per_sample(m, args.batch, args.seed) for k, m in models.items()}
    times = time_sampling(models, args.batch, args.repeats, args.seed)
    fff_rate = args.batch / statistics.median(times["fff"])
    for key in models:
        rates = [args.batch / t for t in times[key]]
        rate = args.batch / statistics.median(times[key])
        info[key].update(
            samples_per_second=rate,
            samples_per_second_min=min(rates),
            samples_per_second_max=max(rates),
            seconds=times[key],
            nfe_per_sample=nfe[key],
            fff_speedup=fff_rate / rate,
            fff_speedup_paired=statistics.median(
                t / f for t, f in zip(times[key], times["fff"], strict=True)
            ),
            fff_speedup_paired_quartiles=_quartiles(
                [t / f for t, f in zip(times[key], times["fff"], strict=True)]
            ),
        )
    result = {
        "benchmark": "sampling speed, two moons",
        "seed": args.seed,
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": 1,
        "cnf_sampling_solver": f"dopri5, rtol = atol = {SAMPLE_TOL:g}",
        "machine": platform.platform(),
        "torch": torch.__version__,
        "command": "python benchmarks/sampling_speed.py "
        + (" ".join(["--reuse", *args.reuse]) if args.reuse else " ".join(f"--set {s}" for s in args.set)),
        "models": info,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (RESULTS / f"{args.name}.md").write_text(f"# Sampling speed\n\n{table}")
    print(table)
    return result


if __name__ == "__main__":
    main()
