"""``beta: auto`` against a sweep of fixed β, at the same number of steps.

For each task the preset's free-form flow is trained through the runner API
(:func:`freeflows.runner.train.train`) with β fixed at each value of the task's grid and with
``model.<kind>.beta=auto`` (the default ``beta_auto`` section: start 100, target 0.1 on
``val/inverse_defect_per_dim``, no tuning; ``--auto-starts`` adds runs from other starting β). Only
these fields are overridden, the same for every run of a task:

* ``model.<kind>.beta`` (a number, or ``auto``) and, for ``auto``, ``beta_auto.start``,
* ``trainer.max_steps`` (the task's steps, or ``--steps``), ``trainer.val_every_epochs``
  (``--val-every``), ``trainer.threads=1``, ``seed``,
* ``trainer.plot=false`` and ``trainer.progress_bar=false``.

The tasks (:data:`TASKS`): the ``two-moons``, ``eight-gaussians`` and ``gaussian-mixture-1d``
toys, the ``dw4`` Boltzmann preset (an E(n)-equivariant free-form flow; NLL in the
6-dimensional mean-free subspace) and the SBI presets ``sbi-two_moons`` and
``sbi-gaussian_mixture`` (conditional posteriors at a budget of 10,000 simulations; NLL of
held-out pairs in standardised θ). Their β grids bracket the preset's β.

``beta: auto`` updates β once per validation, so the validation cadence sets how often β can
move (at most a factor 2 per validation). ``--val-every 1`` (the default here) validates every
epoch for every run, fixed and auto alike; the validations also pick the weights that are
evaluated (best validation NLL).

Every run is scored from its ``metrics.json``: the normalised density's test NLL
(``test_nll`` ± ``test_nll_stderr``, with ``test_nll_unsolved``), ``kl_to_truth`` ± stderr on
eight Gaussians, and ``density_mass`` ± stderr; for ``auto`` also the final β (the last
``beta`` row of the run's ``metrics.csv``). The goal checked per task: the score of ``auto`` is
within one standard error (the best run's, over test points) of the best fixed β's. A run with
test points its density cannot evaluate (``test_nll_unsolved``: the decoder's inverse did not
converge there) scores only the others; with more than 1 % of them unsolved it is not compared
(not a candidate for the best fixed β, and a failure for auto).

Writes ``<out>/beta_auto.json`` (after every run) and ``<out>/beta_auto.md``, and with
``--plot`` the β trajectories of the auto runs (and their ``val/inverse_defect``) as a PNG.

    python benchmarks/beta_auto.py --val-every 1 10 --workers 2 --plot docs/img/beta-auto.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freeflows.experiments.config import default_config

ROOT = Path(__file__).resolve().parent
NAME = "beta_auto"


@dataclass(frozen=True)
class Task:
    """One preset of the comparison: its score, its number of steps and its fixed-β grid."""

    score: str
    steps: int
    betas: tuple[float, ...]


TASKS = {
    "two-moons": Task("test_nll", 2000, (3.0, 10.0, 30.0, 100.0)),
    "eight-gaussians": Task("kl_to_truth", 2000, (3.0, 10.0, 30.0, 100.0)),
    "gaussian-mixture-1d": Task("kl_to_truth", 3000, (3.0, 10.0, 30.0, 100.0)),
    "dw4": Task("test_nll", 1500, (3.0, 10.0, 30.0, 100.0)),
    "sbi-two_moons": Task("test_nll", 10000, (30.0, 100.0, 300.0, 1000.0)),
    "sbi-gaussian_mixture": Task("test_nll", 10000, (30.0, 100.0, 300.0, 1000.0)),
}
#: the default start of ``beta: auto`` (the config's ``beta_auto.start``)
DEFAULT_START = float(default_config()["beta_auto"]["start"])
#: the largest share of test points a run's density may leave unsolved and still be compared
UNSOLVED_LIMIT = 0.01
KEEP = (
    "test_nll",
    "test_nll_stderr",
    "test_nll_unsolved",
    "kl_to_truth",
    "kl_to_truth_stderr",
    "true_test_nll",
    "density_mass",
    "density_mass_stderr",
    "n_params",
    "train_seconds",
    "steps",
    "nonfinite_batches_skipped",
    "n_test",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="max_steps of every run (default: the task's)")
    p.add_argument("--betas", type=float, nargs="+", default=None, help="fixed β (default: the task's)")
    p.add_argument("--datasets", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument(
        "--auto-starts", type=float, nargs="+", default=[DEFAULT_START], help="beta_auto.start of auto runs"
    )
    p.add_argument(
        "--auto-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides of the auto runs only, e.g. beta_auto.target=0.06",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--val-every",
        type=int,
        nargs="+",
        default=[1],
        help="trainer.val_every_epochs; one full sweep (fixed and auto) per value",
    )
    p.add_argument("--workers", type=int, default=1, help="trainings run in parallel processes")
    p.add_argument("--out", type=Path, default=ROOT / "results", help="directory of the JSON and Markdown")
    p.add_argument("--runs", type=Path, default=Path("runs") / NAME, help="directory of the run directories")
    p.add_argument("--name", default=NAME, help="stem of the JSON and Markdown files")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --runs")
    p.add_argument("--report-only", action="store_true", help="report the finished runs, train nothing")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the auto runs' β trajectories")
    return p.parse_args(argv)


def auto_label(start: float) -> str:
    """``auto`` from the default start, ``auto@S`` from another."""
    return "auto" if start == DEFAULT_START else f"auto@{start:g}"


def is_auto(label: str) -> bool:
    return label.startswith("auto")


def steps_of(dataset: str, args: argparse.Namespace) -> int:
    return args.steps if args.steps is not None else TASKS[dataset].steps


def labels_of(dataset: str, args: argparse.Namespace) -> list[str]:
    """The runs of one task: its fixed β values, then its auto starts."""
    betas = args.betas if args.betas is not None else TASKS[dataset].betas
    return [f"{float(b):g}" for b in betas] + [auto_label(s) for s in args.auto_starts]


def overrides(dataset: str, label: str, val_every: int, args: argparse.Namespace) -> list[str]:
    from freeflows.experiments.config import load_config

    kind = load_config(dataset)["model"]["kind"]
    beta = [f"model.{kind}.beta={label}"]
    if is_auto(label):
        start = DEFAULT_START if label == "auto" else float(label.split("@")[1])
        beta = [f"model.{kind}.beta=auto", f"beta_auto.start={start:g}", *args.auto_set]
    return [
        *beta,
        f"trainer.max_steps={steps_of(dataset, args)}",
        f"trainer.val_every_epochs={val_every}",
        "trainer.threads=1",
        f"seed={args.seed}",
        "trainer.plot=false",
        "trainer.progress_bar=false",
    ]


def run_dir_of(dataset: str, label: str, val_every: int, args: argparse.Namespace) -> Path:
    return args.runs / f"{dataset}-beta{label}-s{args.seed}-{steps_of(dataset, args)}-v{val_every}"


def _train(dataset: str, over: list[str], run_dir: str) -> float:
    """Train one run (in a worker process); returns its CPU seconds (training and evaluation)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from freeflows.experiments.config import load_config
    from freeflows.runner.train import train

    cfg = load_config(dataset, over)
    cpu = time.process_time()
    train(cfg, Path(run_dir))
    return time.process_time() - cpu


def row_of(
    dataset: str, label: str, val_every: int, args: argparse.Namespace, cpu: float | None
) -> dict[str, Any]:
    run_dir = run_dir_of(dataset, label, val_every, args)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row: dict[str, Any] = {
        "dataset": dataset,
        "val_every_epochs": val_every,
        "steps_run": steps_of(dataset, args),
        "beta": label,
        "run_dir": str(run_dir),
        **{k: metrics[k] for k in KEEP if k in metrics},
    }
    timing = run_dir / "cpu_seconds.json"
    if cpu is not None:
        timing.write_text(json.dumps({"cpu_seconds": cpu}))
    if timing.is_file():
        row["cpu_seconds"] = json.loads(timing.read_text())["cpu_seconds"]
    if is_auto(label):
        from freeflows.plots.density import read_curves

        curves = read_curves(run_dir / "metrics.csv")

        def pairs(metric: str) -> list[tuple[int, float]]:
            return list(zip(*curves.get(metric, ([], [])), strict=True))

        logged = pairs("beta")  # every step; keep the changes and the end
        betas = [b for i, b in enumerate(logged) if i in (0, len(logged) - 1) or b[1] != logged[i - 1][1]]
        row["final_beta"] = betas[-1][1] if betas else float("nan")
        row["beta_trajectory"] = betas
        row["inverse_defect_trajectory"] = pairs("val/inverse_defect")
        row["inverse_defect_per_dim_trajectory"] = pairs("val/inverse_defect_per_dim")
    return row


def comparable(row: dict[str, Any]) -> bool:
    """Whether a run's score covers all but at most :data:`UNSOLVED_LIMIT` of the test points."""
    return row.get("test_nll_unsolved", 0) <= UNSOLVED_LIMIT * row.get("n_test", 0)


def verdicts(rows: list[dict[str, Any]], datasets: list[str], cadences: list[int]) -> list[dict[str, Any]]:
    """Per task, validation cadence and auto start: the best fixed β by the task's score, and
    whether auto is within one standard error (the best run's) of it."""
    out = []
    for dataset, val_every in [(d, v) for v in cadences for d in datasets]:
        key = TASKS[dataset].score
        mine = [r for r in rows if (r["dataset"], r["val_every_epochs"]) == (dataset, val_every) and key in r]
        # a run whose density leaves many test points unsolved scores a subset: not comparable
        fixed = [r for r in mine if not is_auto(r["beta"]) and comparable(r)]
        excluded = [r["beta"] for r in mine if not is_auto(r["beta"]) and not comparable(r)]
        if not fixed:
            continue
        best = min(fixed, key=lambda r: r[key])
        for auto in [r for r in mine if is_auto(r["beta"])]:
            gap = auto[key] - best[key]
            out.append(
                {
                    "dataset": dataset,
                    "val_every_epochs": val_every,
                    "auto_run": auto["beta"],
                    "score": key,
                    "best_fixed_beta": best["beta"],
                    "best_fixed": best[key],
                    "best_fixed_stderr": best[f"{key}_stderr"],
                    "auto": auto[key],
                    "auto_stderr": auto[f"{key}_stderr"],
                    "gap": gap,
                    "gap_in_stderr": gap / best[f"{key}_stderr"],
                    "excluded_fixed_betas": excluded,
                    "auto_unsolved": auto.get("test_nll_unsolved", 0),
                    "met": gap <= best[f"{key}_stderr"] and comparable(auto),
                    "final_beta": auto.get("final_beta"),
                    "beta_updates": len(auto.get("inverse_defect_trajectory", [])),
                }
            )
    return out


def _pm(row: dict[str, Any], key: str, digits: int = 3) -> str:
    return f"{row[key]:.{digits}f} ± {row[key + '_stderr']:.{digits}f}" if key in row else "—"


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| task | steps | val. every | β | test NLL ↓ | unsolved | KL to truth ↓ | mass | final β | CPU s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        final = f"{r['final_beta']:.1f}" if "final_beta" in r else ""
        cpu = f"{r['cpu_seconds']:.0f}" if "cpu_seconds" in r else "—"
        lines.append(
            f"| {r['dataset']} | {r['steps_run']} | {r['val_every_epochs']} ep. | {r['beta']} | "
            f"{_pm(r, 'test_nll')} | {r.get('test_nll_unsolved', 0)} | {_pm(r, 'kl_to_truth')} | "
            f"{_pm(r, 'density_mass')} | {final} | {cpu} |"
        )
    return lines


def verdict_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for v in result["verdicts"]:
        score = "test NLL" if v["score"] == "test_nll" else "KL to the truth"
        start = DEFAULT_START if v["auto_run"] == "auto" else float(v["auto_run"].split("@")[1])
        lines.append(
            f"- **{v['dataset']}**, validation every {v['val_every_epochs']} epoch(s) ({score}): "
            f"best fixed β = {v['best_fixed_beta']} with "
            f"{v['best_fixed']:.3f} ± {v['best_fixed_stderr']:.3f}; {v['auto_run']} {v['auto']:.3f} ± "
            f"{v['auto_stderr']:.3f} (final β {v['final_beta']:.1f} after {v['beta_updates']} updates "
            f"from {start:g}), "
            f"{v['gap']:+.3f} = "
            f"{v['gap_in_stderr']:+.1f} standard errors: goal **{'met' if v['met'] else 'not met'}**."
            + (f" {v['auto_unsolved']} unsolved test points." if v["auto_unsolved"] else "")
            + (
                f" Not comparable (more than {UNSOLVED_LIMIT:.0%} of the test points unsolved): β = "
                f"{', '.join(v['excluded_fixed_betas'])}."
                if v["excluded_fixed_betas"]
                else ""
            )
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    tasks = [
        f"- `{d}`: {t['model']} ({t['n_params']:,} parameters), batch {t['batch_size']}, lr {t['lr']:g}, "
        f"{t['schedule']} schedule, {t['n_train']:,} train / {t['n_test']:,} test points, an epoch is "
        f"{t['steps_per_epoch']} steps; validation on {t['val_batches']}×{t['val_batch_size']} points."
        for d, t in s["tasks"].items()
    ]
    lines = [
        "# β: auto against a fixed-β sweep (same steps)",
        "",
        f"Command: `{s['command']}`",
        "",
        "Each task's preset, changed only in β, the number of steps, the validation cadence "
        f"(every {' or '.join(map(str, s['val_every_epochs']))} epoch(s)), one thread and the seed "
        f"({s['seed']}); weights of the best validation NLL are evaluated. {s['workers']} runs in "
        f"parallel, {s['machine']} (shared machine: times are indicative). `auto` uses the default "
        f"`beta_auto` section ({', '.join(f'{k} {v}' for k, v in s['beta_auto'].items())}); `auto@S` "
        "the same from β = S.",
        "",
        *tasks,
        "",
        "Scores use the normalised density; ± is the standard error over test points. "
        "*Unsolved* counts test points where the decoder's inverse g(z) = x did not converge "
        "(outside the decoder's range); the scores then average the other points only, so a run "
        f"with more than {UNSOLVED_LIMIT:.0%} of its test points unsolved is not compared (not a "
        "candidate for the best fixed β, and a failure for auto). Mass is the "
        "integral of the density (1 for a normalised density). CPU s is the run's "
        "process CPU time, training and evaluation.",
        "",
        *table(result),
        "",
        "Goal: auto within one standard error (the best run's) of the best fixed β.",
        "",
        *verdict_lines(result),
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path, metric: str, target: float) -> None:
    """β of every auto run (left) and the metric it holds at ``target`` (right), over training;
    one colour per task, solid from the default start and dashed from the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = {"val/inverse_defect": "inverse_defect_trajectory"}.get(metric, "inverse_defect_per_dim_trajectory")
    colours = {d: f"C{i}" for i, d in enumerate(result["settings"]["datasets"])}
    fig, (ax_b, ax_d) = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in result["runs"]:
        if not is_auto(r["beta"]) or not r["beta_trajectory"]:
            continue
        style = {"color": colours[r["dataset"]], "ls": "-" if r["beta"] == "auto" else "--", "lw": 1.2}
        label = f"{r['dataset']} {r['beta']}" + (
            f", val. every {r['val_every_epochs']} ep." if r["val_every_epochs"] != 1 else ""
        )
        steps, betas = zip(*r["beta_trajectory"], strict=True)
        ax_b.plot([s / r["steps_run"] for s in steps], betas, label=label, **style)
        if r.get(key):
            s, d = zip(*r[key], strict=True)
            ax_d.plot([x / r["steps_run"] for x in s], d, **style)
    ax_b.set(xlabel="fraction of training", ylabel="β", yscale="log", title="β (beta: auto)")
    ax_d.axhline(target, color="k", lw=0.8, ls=":", label=f"target {target:g}")
    ax_d.set(xlabel="fraction of training", ylabel=metric, yscale="log", title=f"{metric} (validation)")
    ax_d.legend(fontsize=7, loc="upper right")
    fig.legend(*ax_b.get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(0.995, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def task_settings(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """The preset's sizes that the Markdown quotes (the run's config, as trained)."""
    from freeflows.experiments.config import load_config

    cfg = load_config(dataset, overrides(dataset, "auto", args.val_every[0], args))
    kind, opt, tr, data = cfg["model"]["kind"], cfg["optim"], cfg["trainer"], cfg["data"]
    n_train = data["n_train"]
    if dataset.startswith("sbi-"):  # the budget less its validation (10 %) and test (5 %) pairs
        n_train = round(n_train * 0.85)
    shape = ("hidden", "blocks", "layers", "depth")
    sizes = ", ".join(f"{k} {v}" for k, v in cfg["model"][kind].items() if k in shape)
    return {
        "model": f"{kind} ({sizes})",
        "n_params": 0,
        "steps": steps_of(dataset, args),
        "betas": labels_of(dataset, args),
        "batch_size": tr["batch_size"],
        "lr": opt["lr"],
        "schedule": opt["schedule"],
        "n_train": n_train,
        "n_test": data.get("n_test", 0),
        "steps_per_epoch": max(1, n_train // tr["batch_size"]),
        "val_batches": tr["val_batches"],
        "val_batch_size": tr["val_batch_size"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    from freeflows.experiments.config import load_config

    torch.set_num_threads(1)
    settings: dict[str, Any] = {
        "command": "python benchmarks/beta_auto.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "datasets": args.datasets,
        "auto_starts": args.auto_starts,
        "auto_set": args.auto_set,
        "seed": args.seed,
        "workers": args.workers,
        "val_every_epochs": args.val_every,
        "tasks": {d: task_settings(d, args) for d in args.datasets},
        "beta_auto": load_config(args.datasets[0], [o for o in args.auto_set if o.startswith("beta_auto.")])[
            "beta_auto"
        ],
        "machine": f"{platform.machine()}, torch {torch.__version__}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(d, b, v) for v in args.val_every for d in args.datasets for b in labels_of(d, args)]
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    result: dict[str, Any] = {"settings": settings, "verdicts": {}, "runs": []}

    def record(dataset: str, label: str, val_every: int, cpu: float | None) -> None:
        done[(dataset, label, val_every)] = row_of(dataset, label, val_every, args, cpu)
        result["runs"] = [done[j] for j in jobs if j in done]
        for r in result["runs"]:
            settings["tasks"][r["dataset"]]["n_params"] = r.get("n_params", 0)
            settings["tasks"][r["dataset"]]["n_test"] = r.get("n_test", 0)
        result["verdicts"] = verdicts(result["runs"], args.datasets, args.val_every)
        if todo:  # the wall time of the trainings run by this call
            settings["total_wall_seconds"] = time.perf_counter() - t0
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
        (args.out / f"{args.name}.md").write_text(markdown(result))

    t0 = time.perf_counter()
    todo: list[tuple[str, str, int]] = []
    for job in jobs:
        if (args.reuse or args.report_only) and (run_dir_of(*job, args) / "metrics.json").is_file():
            record(*job, None)
        elif not args.report_only:
            todo.append(job)
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {
            pool.submit(_train, d, overrides(d, b, v, args), str(run_dir_of(d, b, v, args))): (d, b, v)
            for d, b, v in todo
        }
        for future in as_completed(futures):
            dataset, label, val_every = futures[future]
            cpu = future.result()
            print(f"  {dataset} beta={label} val every {val_every}: {cpu:.0f} CPU-s", flush=True)
            record(dataset, label, val_every, cpu)
    if args.plot and any(is_auto(r["beta"]) for r in result["runs"]):
        plot(result, args.plot, settings["beta_auto"]["metric"], float(settings["beta_auto"]["target"]))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
