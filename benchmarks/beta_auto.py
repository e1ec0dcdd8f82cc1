"""``model.fff.beta: auto`` against a sweep of fixed β, at the same number of steps.

For each preset (``two-moons``, ``eight-gaussians``) the preset's free-form flow is trained
through the runner API (:func:`freeflows.runner.train.train`) with β fixed at each value of
``--betas`` and with ``model.fff.beta=auto`` (the default ``beta_auto`` section: start 10,
target 0.06 on ``val/inverse_defect``, no tuning). Only these fields are overridden, the same
for every run:

* ``model.fff.beta`` (a number, or ``auto``),
* ``trainer.max_steps`` (``--steps``), ``trainer.val_every_epochs`` (``--val-every``),
  ``trainer.threads=1``, ``seed``,
* ``trainer.plot=false`` and ``trainer.progress_bar=false``.

``beta: auto`` updates β once per validation, so the validation cadence sets how often β can
move (at most a factor 2 per validation); the presets validate every 10 epochs (about 980 steps
at 50,000 training points and batch 512), which leaves ``auto`` two updates in 2000 steps.
``--val-every 1`` (the default here) validates every epoch for every run, fixed and auto alike;
the validations also pick the weights that are evaluated (best validation NLL).

Every run is scored from its ``metrics.json``: the normalised density's test NLL
(``test_nll`` ± ``test_nll_stderr``, with ``test_nll_unsolved``), ``kl_to_truth`` ± stderr on
eight Gaussians, and ``density_mass`` ± stderr; for ``auto`` also the final β (the last
``beta`` row of the run's ``metrics.csv``). The goal checked per task: the score of ``auto`` is
within one standard error (the best run's, over test points) of the best fixed β's. A run with
test points its density cannot evaluate (``test_nll_unsolved > 0``: the decoder's inverse did
not converge there) scores only the others, so it is not a candidate for the best fixed β.

Writes ``<out>/beta_auto.json`` (after every run) and ``<out>/beta_auto.md``, and with
``--plot`` the β trajectories of the auto runs (and their ``val/inverse_defect``) as a PNG.

    python benchmarks/beta_auto.py --steps 2000 --workers 2 --plot docs/img/beta-auto.png
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
NAME = "beta_auto"
DATASETS = ("two-moons", "eight-gaussians")
#: the task's score: KL to the truth where the density is known, else the test NLL
SCORE = {"two-moons": "test_nll", "eight-gaussians": "kl_to_truth"}
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
    p.add_argument("--steps", type=int, default=2000, help="trainer.max_steps for every run")
    p.add_argument("--betas", type=float, nargs="+", default=[3.0, 10.0, 30.0, 100.0], help="fixed β values")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
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
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --runs")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the auto runs' β trajectories")
    return p.parse_args(argv)


def beta_label(beta: float | str) -> str:
    return "auto" if beta == "auto" else f"{float(beta):g}"


def overrides(beta: float | str, val_every: int, args: argparse.Namespace) -> list[str]:
    return [
        f"model.fff.beta={beta_label(beta)}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_every_epochs={val_every}",
        "trainer.threads=1",
        f"seed={args.seed}",
        "trainer.plot=false",
        "trainer.progress_bar=false",
    ]


def run_dir_of(dataset: str, beta: float | str, val_every: int, args: argparse.Namespace) -> Path:
    return args.runs / f"{dataset}-beta{beta_label(beta)}-s{args.seed}-{args.steps}-v{val_every}"


def _train(dataset: str, over: list[str], run_dir: str) -> float:
    """Train one run (in a worker process); returns its CPU seconds (training and evaluation)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from freeflows.experiments.config import load_config
    from freeflows.runner.train import train

    cfg = load_config(dataset, over)
    cpu = time.process_time()
    train(cfg, Path(run_dir))
    return time.process_time() - cpu


def read_csv(path: Path, metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` rows of one metric of a run's long-format ``metrics.csv``."""
    with open(path, newline="") as fh:
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(fh) if r["metric"] == metric]


def row_of(
    dataset: str, beta: float | str, val_every: int, args: argparse.Namespace, cpu: float | None
) -> dict[str, Any]:
    run_dir = run_dir_of(dataset, beta, val_every, args)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row: dict[str, Any] = {
        "dataset": dataset,
        "val_every_epochs": val_every,
        "beta": beta_label(beta),
        "run_dir": str(run_dir),
        **{k: metrics[k] for k in KEEP if k in metrics},
    }
    timing = run_dir / "cpu_seconds.json"
    if cpu is not None:
        timing.write_text(json.dumps({"cpu_seconds": cpu}))
    if timing.is_file():
        row["cpu_seconds"] = json.loads(timing.read_text())["cpu_seconds"]
    if beta == "auto":
        betas = read_csv(run_dir / "metrics.csv", "beta")
        defect = read_csv(run_dir / "metrics.csv", "val/inverse_defect")
        row["final_beta"] = betas[-1][1] if betas else float("nan")
        row["beta_trajectory"] = betas
        row["inverse_defect_trajectory"] = defect
    return row


def verdicts(rows: list[dict[str, Any]], datasets: list[str], cadences: list[int]) -> list[dict[str, Any]]:
    """Per task and validation cadence: the best fixed β by the task's score, and whether auto is
    within one standard error (the best run's) of it."""
    out = []
    for dataset, val_every in [(d, v) for v in cadences for d in datasets]:
        key = SCORE[dataset]
        mine = [r for r in rows if (r["dataset"], r["val_every_epochs"]) == (dataset, val_every) and key in r]
        auto = [r for r in mine if r["beta"] == "auto"]
        # a run whose density has test points it cannot evaluate scores a subset: not comparable
        fixed = [r for r in mine if r["beta"] != "auto" and not r.get("test_nll_unsolved")]
        if not fixed or not auto:
            continue
        best = min(fixed, key=lambda r: r[key])
        gap = auto[0][key] - best[key]
        excluded = [r["beta"] for r in mine if r["beta"] != "auto" and r.get("test_nll_unsolved")]
        out.append({
            "dataset": dataset,
            "val_every_epochs": val_every,
            "score": key,
            "best_fixed_beta": best["beta"],
            "best_fixed": best[key],
            "best_fixed_stderr": best[f"{key}_stderr"],
            "auto": auto[0][key],
            "auto_stderr": auto[0][f"{key}_stderr"],
            "gap": gap,
            "gap_in_stderr": gap / best[f"{key}_stderr"],
            "excluded_fixed_betas": excluded,
            "auto_unsolved": auto[0].get("test_nll_unsolved", 0),
            "met": gap <= best[f"{key}_stderr"] and not auto[0].get("test_nll_unsolved"),
            "final_beta": auto[0].get("final_beta"),
            "beta_updates": len(auto[0].get("inverse_defect_trajectory", [])),
        })
    return out


def _pm(row: dict[str, Any], key: str, digits: int = 3) -> str:
    return f"{row[key]:.{digits}f} ± {row[key + '_stderr']:.{digits}f}" if key in row else "—"


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| task | val. every | β | test NLL ↓ | unsolved | KL to truth ↓ | mass | final β | CPU s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        final = f"{r['final_beta']:.1f}" if "final_beta" in r else ""
        lines.append(
            f"| {r['dataset']} | {r['val_every_epochs']} ep. | {r['beta']} | {_pm(r, 'test_nll')} | "
            f"{r.get('test_nll_unsolved', 0)} | {_pm(r, 'kl_to_truth')} | "
            f"{_pm(r, 'density_mass')} | {final} | {r.get('cpu_seconds', float('nan')):.0f} |"
        )
    return lines


def verdict_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    start = result["settings"]["beta_auto"]["start"]
    for v in result["verdicts"]:
        score = "test NLL" if v["score"] == "test_nll" else "KL to the truth"
        lines.append(
            f"- **{v['dataset']}**, validation every {v['val_every_epochs']} epoch(s) ({score}): "
            f"best fixed β = {v['best_fixed_beta']} with "
            f"{v['best_fixed']:.3f} ± {v['best_fixed_stderr']:.3f}; auto {v['auto']:.3f} ± "
            f"{v['auto_stderr']:.3f} (final β {v['final_beta']:.1f} after {v['beta_updates']} updates "
            f"from {start:g}), "
            f"{v['gap']:+.3f} = "
            f"{v['gap_in_stderr']:+.1f} standard errors: goal **{'met' if v['met'] else 'not met'}**."
            + (
                f" Not comparable (test points the density cannot evaluate): β = "
                f"{', '.join(v['excluded_fixed_betas'])}."
                if v["excluded_fixed_betas"]
                else ""
            )
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# β: auto against a fixed-β sweep (same steps)",
        "",
        f"Command: `{s['command']}`",
        "",
        f"The presets' free-form flow (hidden {s['hidden']}, {s['blocks']} blocks, {s['n_params']:,} "
        f"parameters), {s['steps']} steps of Adam, batch {s['batch_size']}, lr {s['lr']:g}, "
        f"{s['schedule']} schedule, validation every {' or '.join(map(str, s['val_every_epochs']))} "
        f"epoch(s) (an epoch is {s['steps_per_epoch']} steps) on "
        f"{s['val_batches']}×{s['val_batch_size']} points, weights of the best validation NLL; "
        f"data: the presets' splits ({s['n_train']:,} train / {s['n_test']:,} test points); seed "
        f"{s['seed']}; one torch thread per run, {s['workers']} runs in parallel, {s['machine']} "
        "(shared machine: times are indicative). `auto` uses the default `beta_auto` section "
        f"({', '.join(f'{k} {v}' for k, v in s['beta_auto'].items())}).",
        "",
        "Scores use the normalised density; ± is the standard error over test points. "
        "*Unsolved* counts test points where the decoder's inverse g(z) = x did not converge "
        "(outside the decoder's range); the scores then average the other points only, so such a "
        "run is not a candidate for the best fixed β. Mass is the "
        "integral of the density over the plane (1 for a normalised density). CPU s is the run's "
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


def plot(result: dict[str, Any], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_b, ax_d) = plt.subplots(1, 2, figsize=(9, 3.2))
    for r in result["runs"]:
        if r["beta"] != "auto":
            continue
        label = f"{r['dataset']}, val. every {r['val_every_epochs']} ep."
        steps, betas = zip(*r["beta_trajectory"], strict=True)
        (line,) = ax_b.plot(steps, betas, label=label)
        if r["inverse_defect_trajectory"]:
            s, d = zip(*r["inverse_defect_trajectory"], strict=True)
            ax_d.plot(s, d, marker=".", color=line.get_color(), label=label)
    ax_b.set(xlabel="step", ylabel="β", yscale="log", title="β (beta: auto)")
    ax_d.axhline(target, color="k", lw=0.8, ls="--", label=f"target {target:g}")
    ax_d.set(xlabel="step", ylabel="val/inverse_defect", yscale="log", title="inverse defect")
    ax_b.legend(fontsize=8)
    ax_d.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    from freeflows.experiments.config import load_config

    torch.set_num_threads(1)
    ref = load_config(args.datasets[0], overrides("auto", args.val_every[0], args))
    opt, tr, data = ref["optim"], ref["trainer"], ref["data"]
    settings: dict[str, Any] = {
        "command": "python benchmarks/beta_auto.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "steps": args.steps,
        "betas": args.betas,
        "datasets": args.datasets,
        "seed": args.seed,
        "workers": args.workers,
        "val_every_epochs": args.val_every,
        "steps_per_epoch": ref["data"]["n_train"] // tr["batch_size"],
        "val_batches": tr["val_batches"],
        "val_batch_size": tr["val_batch_size"],
        "batch_size": tr["batch_size"],
        "lr": opt["lr"],
        "schedule": opt["schedule"],
        "n_train": data["n_train"],
        "n_test": data["n_test"],
        "hidden": ref["model"]["fff"]["hidden"],
        "blocks": ref["model"]["fff"]["blocks"],
        "n_params": 0,
        "beta_auto": ref["beta_auto"],
        "machine": f"{platform.machine()}, torch {torch.__version__}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(d, b, v) for v in args.val_every for d in args.datasets for b in [*args.betas, "auto"]]
    done: dict[tuple[str, Any, int], dict[str, Any]] = {}
    result: dict[str, Any] = {"settings": settings, "verdicts": {}, "runs": []}

    def record(dataset: str, beta: Any, val_every: int, cpu: float | None) -> None:
        done[(dataset, beta, val_every)] = row_of(dataset, beta, val_every, args, cpu)
        result["runs"] = [done[j] for j in jobs if j in done]
        settings["n_params"] = result["runs"][0].get("n_params", 0)
        result["verdicts"] = verdicts(result["runs"], args.datasets, args.val_every)
        if todo:  # the wall time of the trainings run by this call
            settings["total_wall_seconds"] = time.perf_counter() - t0
        (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=2))
        (args.out / f"{NAME}.md").write_text(markdown(result))

    t0 = time.perf_counter()
    todo: list[tuple[str, Any, int]] = []
    for job in jobs:
        if args.reuse and (run_dir_of(*job, args) / "metrics.json").is_file():
            record(*job, None)
        else:
            todo.append(job)
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {
            pool.submit(_train, d, overrides(b, v, args), str(run_dir_of(d, b, v, args))): (d, b, v)
            for d, b, v in todo
        }
        for future in as_completed(futures):
            dataset, beta, val_every = futures[future]
            cpu = future.result()
            print(f"  {dataset} beta={beta_label(beta)} val every {val_every}: {cpu:.0f} CPU-s", flush=True)
            record(dataset, beta, val_every, cpu)
    if args.plot and any(r["beta"] == "auto" for r in result["runs"]):
        plot(result, args.plot, float(ref["beta_auto"]["target"]))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
