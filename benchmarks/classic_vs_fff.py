"""Free-form flow against the classic exact flows on two 2-D toy data sets, at the same budget.

Every model is trained through the runner API (:func:`freeflows.runner.train.train`) from the
shipped presets ``eight-gaussians`` and ``two-moons``; only these fields are overridden:

* ``model.kind`` (the model; its hyper-parameters are the defaults of ``model.<kind>``, so the
  ``fff`` rows use exactly the preset's free-form flow),
* ``trainer.max_steps`` (``--steps``), ``trainer.threads`` (``--threads``), ``seed``,
* ``trainer.plot=false`` and ``trainer.progress_bar=false``;
* for ``--extra`` rows only, some ``model.<kind>.*`` options (e.g. a classic flow widened to the
  free-form flow's parameter count: ``--extra realnvp:hidden=128``).

So every model gets the same data (the preset's splits), the same batch size, optimiser (Adam),
learning rate, schedule (the preset's; cosine decay to zero over ``--steps``), gradient clipping
and validation cadence, and the weights with the best validation NLL are evaluated. Results:

* eight-gaussians: :math:`\\mathrm{KL}(p\\,\\|\\,q) = \\mathbb E_p[\\log p - \\log q]`, a Monte Carlo
  estimate on the test split (exact :math:`\\log q` for every model); ``±`` is its standard error
  over test points with one seed, or the standard error over seeds with several;
* two-moons: the test NLL (nats), ``±`` likewise;
* parameters, training wall time, and sampling wall time per sample (median of 3 draws of 2000).

With ``--peers nsf maf``, zuko's ``NSF`` and ``MAF`` (zuko's defaults; ``pip install
'freeflows[bench]'``) are added as external baselines. They are not runner models, so they are
trained by the plain loop of :mod:`peer_baseline` on the same preset split and batch size for
the same number of steps, with Adam at the preset's learning rate, the one-cycle shape in step
progress (without momentum cycling) and the same gradient clip, and their *final* weights are
evaluated (no best-validation selection). The equal-CPU-time comparison with NSF, all models
through that one loop, is ``benchmarks/peer_toys.py``.

Writes ``<out>/classic_vs_fff.json`` (after every run, so partial results survive) and
``<out>/classic_vs_fff.md``.

    python benchmarks/classic_vs_fff.py --steps 2000 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from freeflows.experiments.config import load_config
from freeflows.runner.train import train

ROOT = Path(__file__).resolve().parent
DEFAULT_KINDS = ("fff", "planar", "nice", "realnvp", "glow", "maf", "iaf")
ALL_KINDS = (*DEFAULT_KINDS, "cnf")
DATASETS = ("eight-gaussians", "two-moons")
NAME = "classic_vs_fff"
PEERS = ("nsf", "maf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="trainer.max_steps for every model")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (data splits and init)")
    p.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), choices=ALL_KINDS)
    p.add_argument(
        "--extra",
        nargs="+",
        default=[],
        metavar="KIND:OPT=VAL,...",
        help="extra rows with changed model options, e.g. realnvp:hidden=128 (same budget otherwise)",
    )
    p.add_argument(
        "--peers",
        nargs="*",
        default=[],
        choices=PEERS,
        help="zuko flows as external baselines (zuko's defaults, trained by peer_baseline's loop)",
    )
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (trainer.threads)")
    p.add_argument("--out", type=Path, default=ROOT / "results", help="directory of the JSON and Markdown")
    p.add_argument("--runs", type=Path, default=Path("runs") / NAME, help="directory of the run directories")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --runs")
    p.add_argument(
        "--refresh",
        action="store_true",
        help="only re-read the runner rows' metrics.json into <out>/classic_vs_fff.json, redraw the table",
    )
    return p.parse_args(argv)


def parse_model(spec: str) -> tuple[str, list[str]]:
    """``"realnvp:hidden=128,transforms=8"`` -> ``("realnvp", ["model.realnvp.hidden=128", ...])``."""
    kind, _, options = spec.partition(":")
    if kind not in ALL_KINDS:
        raise SystemExit(f"unknown kind {kind!r} in {spec!r}; choose one of {', '.join(ALL_KINDS)}")
    return kind, [f"model.{kind}.{item}" for item in options.split(",") if item]


def label_of(spec: str) -> str:
    if spec.startswith("zuko-"):
        return f"zuko {spec.removeprefix('zuko-').upper()}"
    kind, _, options = spec.partition(":")
    return f"{kind} ({options.replace(',', ', ')})" if options else kind


def config_for(dataset: str, spec: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    kind, model_overrides = parse_model(spec)
    return load_config(
        dataset,
        [
            *model_overrides,
            f"model.kind={kind}",
            f"trainer.max_steps={args.steps}",
            f"trainer.threads={args.threads}",
            f"seed={seed}",
            "trainer.plot=false",
            "trainer.progress_bar=false",
        ],
    )


def run_one(dataset: str, spec: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    slug = spec.replace(":", "-").replace(",", "-").replace("=", "")
    run_dir = args.runs / f"{dataset}-{slug}-s{seed}-{args.steps}"
    cfg = config_for(dataset, spec, seed, args)
    kind = cfg["model"]["kind"]
    metrics_path = run_dir / "metrics.json"
    if not (args.reuse and metrics_path.is_file()):
        t = time.perf_counter()
        train(cfg, run_dir)
        print(f"  {dataset} {spec} seed {seed}: {time.perf_counter() - t:.0f} s wall", flush=True)
    return {
        "dataset": dataset,
        "kind": kind,
        "label": label_of(spec),
        "seed": seed,
        "run_dir": str(run_dir),
        "model_options": cfg["model"][kind],
        "optim": cfg["optim"],
        "batch_size": cfg["trainer"]["batch_size"],
        "n_train": cfg["data"]["n_train"],
        **kept_metrics(metrics_path),
    }


#: metrics.json keys of a runner row: the normalised density's scores and mass, and for the
#: free-form flow the papers' value (not normalised) with its mass.
KEEP = (
    "test_nll",
    "test_nll_stderr",
    "test_nll_unsolved",
    "kl_to_truth",
    "kl_to_truth_stderr",
    "true_test_nll",
    "density_mass",
    "density_mass_stderr",
    "density_mass_unsolved",
    "test_nll_paper",
    "test_nll_paper_stderr",
    "kl_to_truth_paper",
    "kl_to_truth_paper_stderr",
    "density_mass_paper",
    "density_mass_paper_stderr",
    "n_params",
    "train_seconds",
    "sample_seconds_per_sample",
    "steps",
    "nonfinite_batches_skipped",
    "n_test",
)


def kept_metrics(path: Path) -> dict[str, Any]:
    """The :data:`KEEP` keys of a run's ``metrics.json``."""
    metrics = json.loads(path.read_text())
    return {k: metrics[k] for k in KEEP if k in metrics}


def run_peer(dataset: str, peer: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train zuko's ``peer`` flow on the preset's split for ``--steps`` steps (see the module
    docstring) and evaluate it like the runner does: test NLL and KL to the truth, each with its
    standard error over test points, and the sampling time per sample (median of 3 draws of 2000)."""
    from freeflows.runner.train import build
    from peer_baseline import TrainSettings, evaluate_density, train_side_by_side, zuko_contender

    torch.set_num_threads(args.threads)
    cfg = config_for(dataset, "fff", seed, args)
    data, _ = build(cfg)
    torch.manual_seed(seed)
    contender = zuko_contender(peer, data.event_shape[0])
    settings = TrainSettings(
        lr=cfg["optim"]["lr"],
        batch_size=cfg["trainer"]["batch_size"],
        grad_clip=cfg["optim"]["grad_clip"],
        steps=args.steps,
        budget="steps",
    )
    t = time.perf_counter()
    (trainee,) = train_side_by_side([contender], data.train.x, settings, seed)
    train_seconds = time.perf_counter() - t
    metrics = evaluate_density(contender.densities["log_prob"], data.test.x, data.true_log_prob)
    flow = contender.model.flow
    times = []
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            flow().sample((2000,))
            times.append((time.perf_counter() - t) / 2000)
    row = {
        "dataset": dataset,
        "kind": f"zuko-{peer}",
        "label": label_of(f"zuko-{peer}"),
        "seed": seed,
        "model_options": contender.note,
        "batch_size": settings.batch_size,
        "n_train": len(data.train),
        "n_test": len(data.test),
        "n_params": sum(p.numel() for p in contender.model.parameters()),
        "steps": trainee.steps,
        "train_seconds": train_seconds,
        "sample_seconds_per_sample": sorted(times)[1],
        "nonfinite_batches_skipped": trainee.nonfinite_total,
        "test_nll": metrics["nll"],
        "test_nll_stderr": metrics["nll_stderr"],
        "selection": "final weights",
    }
    if "kl" in metrics:
        row.update(kl_to_truth=metrics["kl"], kl_to_truth_stderr=metrics["kl_stderr"])
        row["true_test_nll"] = metrics["true_nll"]
    print(f"  {dataset} {row['label']} seed {seed}: {train_seconds:.0f} s wall", flush=True)
    return row


def _mean_pm(rows: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
    """Mean over seeds and its ± (standard error over seeds; with one seed, the run's own
    standard error over test points)."""
    values = [r[key] for r in rows if key in r]
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, rows[0].get(f"{key}_stderr", float("nan"))
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def summarise(runs: list[dict[str, Any]], specs: list[str]) -> list[dict[str, Any]]:
    table = []
    for spec in specs:
        kind = spec.partition(":")[0]
        mine = [r for r in runs if r["label"] == label_of(spec)]
        if not mine:
            continue
        eight = [r for r in mine if r["dataset"] == "eight-gaussians"]
        moons = [r for r in mine if r["dataset"] == "two-moons"]
        row: dict[str, Any] = {
            "kind": kind,
            "label": label_of(spec),
            "n_params": mine[0]["n_params"],
            "seeds": len({r["seed"] for r in mine}),
        }
        kl = _mean_pm(eight, "kl_to_truth")
        nll = _mean_pm(moons, "test_nll")
        if kl:
            row["kl_eight_gaussians"], row["kl_eight_gaussians_pm"] = kl
        if nll:
            row["nll_two_moons"], row["nll_two_moons_pm"] = nll
        for name, rows in (("eight_gaussians", eight), ("two_moons", moons)):
            mass = _mean_pm(rows, "density_mass")
            if mass:
                row[f"mass_{name}"], row[f"mass_{name}_pm"] = mass
            paper_mass = _mean_pm(rows, "density_mass_paper")
            if paper_mass:
                row[f"mass_paper_{name}"], row[f"mass_paper_{name}_pm"] = paper_mass
        kl_paper = _mean_pm(eight, "kl_to_truth_paper")
        nll_paper = _mean_pm(moons, "test_nll_paper")
        if kl_paper:
            row["kl_paper_eight_gaussians"], row["kl_paper_eight_gaussians_pm"] = kl_paper
        if nll_paper:
            row["nll_paper_two_moons"], row["nll_paper_two_moons_pm"] = nll_paper
        for key in ("train_seconds", "sample_seconds_per_sample"):
            per_data = {}
            for name, rows in (("eight-gaussians", eight), ("two-moons", moons)):
                if rows:
                    per_data[name] = sum(r[key] for r in rows) / len(rows)
            row[key] = per_data
        table.append(row)
    return table


def _fmt_time(per_data: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    return " / ".join(f"{v * scale:.{digits}f}" for v in per_data.values()) or "—"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Free-form flow vs classic flows on 2-D toy data (same budget)",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Budget for every model: {s['steps']} steps of Adam, batch {s['batch_size']}, lr {s['lr']:g}, "
        f"{s['schedule']} schedule over {s['steps']} steps (warm-up {s['warmup_steps']}), gradient clip "
        f"{s['grad_clip']:g}, weights of the best validation NLL (validation every {s['val_every_epochs']} "
        f"epochs on {s['val_batches']}×{s['val_batch_size']} points); data: the presets' splits "
        f"({s['n_train']} train / {s['n_test']} test points); seeds {s['seeds']}; "
        f"{s['threads']} torch thread(s), {s['machine']} (a shared, loaded machine: times are indicative).",
        "",
        (
            "zuko rows (external baselines, zuko's defaults) are trained by "
            "`benchmarks/peer_baseline.py`'s loop with the same steps, batch, Adam learning rate, "
            "one-cycle shape (in step progress, without momentum cycling) and clip, and their final "
            "weights are evaluated (no best-validation selection). The comparison at equal CPU time, "
            "every model through that one loop, is `peer_toys.md`.\n\n"
            if s.get("peers")
            else ""
        )
        + "KL is KL(p‖q) to the true eight-Gaussians density, estimated on the test points (exact log q). "
        + (
            "± is the standard error over test points (one seed)."
            if len(s["seeds"]) == 1
            else "± is the standard error over seeds."
        )
        + f" The true density's test NLL on eight-gaussians is {s['true_test_nll_eight_gaussians']:.3f}.",
        "",
        "Every score uses the model's normalised `log_prob` (for the free-form flow, the density of its "
        'decoder draws). "Mass" is the integral of exp(log_prob) over the plane (quadrature, '
        "201 × 201 nodes; 1 for a normalised density). The free-form flow's papers' value "
        "log p_Z(f(x)) − log|det J_g(f(x))| is **not normalised**; it is shown in its own row with "
        "its mass.",
        "",
        "| model | params | KL 8-gaussians ↓ | test NLL two-moons ↓ | mass (8g / moons) "
        "| train s (8g / moons) | sample µs per sample (8g / moons) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["table"]:
        lines.append(
            f"| {row['label']} | {row['n_params']:,} | {_pm(row, 'kl_eight_gaussians')} | "
            f"{_pm(row, 'nll_two_moons')} | "
            f"{_pm(row, 'mass_eight_gaussians')} / {_pm(row, 'mass_two_moons')} | "
            f"{_fmt_time(row['train_seconds'])} | {_fmt_time(row['sample_seconds_per_sample'], 1e6, 2)} |"
        )
        if "kl_paper_eight_gaussians" in row or "nll_paper_two_moons" in row:
            lines.append(
                f"| {row['label']}, papers' value (**not normalised**) | | "
                f"{_pm(row, 'kl_paper_eight_gaussians')} | "
                f"{_pm(row, 'nll_paper_two_moons')} | {_pm(row, 'mass_paper_eight_gaussians')} / "
                f"{_pm(row, 'mass_paper_two_moons')} | | |"
            )
    lines.append("")
    return "\n".join(lines)


def _pm(row: dict[str, Any], key: str, digits: int = 3) -> str:
    return f"{row[key]:.{digits}f} ± {row[f'{key}_pm']:.{digits}f}" if key in row else "—"


def refresh(args: argparse.Namespace) -> int:
    """Re-read the runner rows of ``<out>/classic_vs_fff.json`` from their run directories (the zuko
    rows are kept as they are) and rewrite the table and the Markdown."""
    path = args.out / f"{NAME}.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist; run the benchmark first")
    result = json.loads(path.read_text())
    for row in result["runs"]:
        metrics = Path(row.get("run_dir", "")) / "metrics.json"
        if "run_dir" in row and metrics.is_file():
            row.update(kept_metrics(metrics))
    s = result["settings"]
    specs = [*s["kinds"], *s["extra"], *(f"zuko-{peer}" for peer in s["peers"])]
    result["table"] = summarise(result["runs"], specs)
    path.write_text(json.dumps(result, indent=2))
    (args.out / f"{NAME}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.refresh:
        return refresh(args)
    if "fff" not in args.kinds:
        print("note: fff is not in --kinds; the table has no free-form flow row", file=sys.stderr)
    for spec in args.extra:
        parse_model(spec)
    specs = [*args.kinds, *args.extra, *(f"zuko-{peer}" for peer in args.peers)]
    ref = config_for(args.datasets[0], args.kinds[0], args.seeds[0], args)
    opt, tr, data = ref["optim"], ref["trainer"], ref["data"]
    for other in args.datasets[1:]:
        o = config_for(other, args.kinds[0], args.seeds[0], args)
        same = (o["optim"], o["trainer"]["batch_size"]) == (opt, tr["batch_size"])
        if not same:
            print(
                f"warning: preset {other} has other optim/batch settings than {args.datasets[0]}",
                file=sys.stderr,
            )
    settings = {
        "command": "python benchmarks/classic_vs_fff.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "steps": args.steps,
        "seeds": args.seeds,
        "kinds": args.kinds,
        "extra": args.extra,
        "peers": args.peers,
        "datasets": args.datasets,
        "threads": args.threads,
        "batch_size": tr["batch_size"],
        "lr": opt["lr"],
        "schedule": opt["schedule"],
        "warmup_steps": opt["warmup_steps"],
        "grad_clip": opt["grad_clip"],
        "weight_decay": opt["weight_decay"],
        "val_every_epochs": tr["val_every_epochs"],
        "val_batches": tr["val_batches"],
        "val_batch_size": tr["val_batch_size"],
        "n_train": data["n_train"],
        "n_test": data["n_test"],
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "true_test_nll_eight_gaussians": float("nan"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {"settings": settings, "table": [], "runs": runs}
    t0 = time.perf_counter()
    for dataset in args.datasets:
        for spec in specs:
            for seed in args.seeds:
                if spec.startswith("zuko-"):
                    runs.append(run_peer(dataset, spec.removeprefix("zuko-"), seed, args))
                else:
                    runs.append(run_one(dataset, spec, seed, args))
                if "true_test_nll" in runs[-1]:
                    settings["true_test_nll_eight_gaussians"] = runs[-1]["true_test_nll"]
                result["table"] = summarise(runs, specs)
                settings["total_wall_seconds"] = time.perf_counter() - t0
                (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=2))
                (args.out / f"{NAME}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
