"""The free-form flow against the flow a user would pick instead (zuko's neural spline flow) on
the toy data sets, side by side in one process, at equal CPU time and at equal steps.

Models (``--models``), all trained by :mod:`peer_baseline`'s loop on the same data and batches:

* ``fff``: the preset's free-form flow, exactly as ``freeflows.runner.train.build`` makes it;
* ``nsf``: ``zuko.flows.NSF(features)`` with zuko's defaults (the peer);
* ``maf``: ``zuko.flows.MAF(features)`` with zuko's defaults (reference);
* ``realnvp``: freeflows' RealNVP with its ``model.realnvp`` defaults (reference; needs 2-D);
* ``--fff-variant SPEC``: further free-form flow rows, the preset's with some changes, to try to
  fix its normalised density in training (issue 14 item 7). ``SPEC`` is ``key=value,...`` with
  keys among the preset's ``model.fff`` options (e.g. ``beta=50``) and the extra loss terms of
  :func:`peer_baseline.fff_contender`: ``cycle`` (weight of ‖f(g(z)) − z‖² on latent draws),
  ``cycle_space`` (``latent`` or ``data``: ‖g(f(g(z))) − g(z)‖²), ``decoder_nll`` (weight of the
  normalised NLL of the draws' distribution on ``decoder_nll_rows`` rows of each batch).

Data sets: the presets ``eight-gaussians``, ``two-moons`` and ``gaussian-mixture-1d`` (data and
train/test split from the preset with the run's seed). Budgets (``--budgets``): ``cpu``, the same
``time.process_time()`` per model (``--cpu-seconds``), interleaved in slices of
``--slice`` CPU-s; ``steps``, the same number of optimiser steps (``--steps``). One torch thread.
Adam with the preset's peak learning rate (``optim.lr``; ``--lr`` to override) and batch size,
the preset's gradient clip, a one-cycle schedule in budget progress, final weights for every
model (no validation-based selection for any).

Reported per model, on the test split: KL(p‖q) = E_p[log p − log q] with its standard error
where the true density is known (eight-gaussians, the 1-D mixture), else the test NLL; steps and
CPU seconds; for the free-form flow both the normalised ``log_prob`` (the density of what
``sample()`` draws; rows whose solve fails are NaN and counted) and the ``paper`` variant
(not normalised). With several seeds, ± is the standard error over seeds.

Writes ``<out>/<name>.json`` (after every task, so partial results survive) and
``<out>/<name>.md``.

    python benchmarks/peer_toys.py --cpu-seconds 60 --steps 2000 --seeds 0 1 2 --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from peer_baseline import (
    Contender,
    TrainSettings,
    evaluate_density,
    exact_flow_contender,
    fff_contender,
    paired_difference,
    train_side_by_side,
    zuko_contender,
)

ROOT = Path(__file__).resolve().parent
DATASETS = ("eight-gaussians", "two-moons", "gaussian-mixture-1d")
MODELS = ("fff", "nsf", "maf", "realnvp")
BUDGETS = ("cpu", "steps")
PEER = "zuko NSF"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument(
        "--fff-variant",
        nargs="*",
        default=[],
        metavar="KEY=VALUE,...",
        help="extra free-form flow rows: preset model.fff options and/or the loss terms cycle, "
        "cycle_space, decoder_nll, decoder_nll_rows (issue 14 item 7)",
    )
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=BUDGETS)
    p.add_argument("--cpu-seconds", type=float, default=60.0, help="CPU-time budget per model")
    p.add_argument("--steps", type=int, default=2000, help="steps per model for the equal-steps budget")
    p.add_argument("--slice", type=float, default=1.0, help="CPU seconds per turn (interleaving)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--no-mass",
        dest="mass",
        action="store_false",
        help="skip the mass of each density (quadrature; about 40k log_prob calls in 2-D)",
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--workers", type=int, default=1, help="processes, one task (data set, seed, budget) each")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--name", default="peer_toys", help="file stem of the JSON and Markdown")
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only rewrite the Markdown of a finished run's JSON (no training)",
    )
    args = p.parse_args(argv)
    for spec in args.fff_variant:
        _parse_variant(spec, set())
    if args.cpu_seconds <= 0 or args.steps < 1 or args.slice <= 0 or args.workers < 1:
        p.error("--cpu-seconds, --steps, --slice and --workers must be positive")
    return args


LOSS_TERMS = {"cycle": float, "cycle_space": str, "decoder_nll": float, "decoder_nll_rows": int}


def _parse_variant(spec: str, fff_options: set[str]) -> tuple[list[str], dict[str, Any]]:
    """``"beta=50,cycle=1"`` -> (config overrides ``["model.fff.beta=50"]``, loss terms
    ``{"cycle": 1.0}``). Keys that are not loss terms must be in ``fff_options`` (unchecked when
    it is empty)."""
    overrides: list[str] = []
    terms: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--fff-variant: {item!r} in {spec!r} is not key=value")
        if key in LOSS_TERMS:
            try:
                terms[key] = LOSS_TERMS[key](value)
            except ValueError:
                raise SystemExit(f"--fff-variant: {key} must be a {LOSS_TERMS[key].__name__}") from None
        elif fff_options and key not in fff_options:
            known = ", ".join(sorted(fff_options | set(LOSS_TERMS)))
            raise SystemExit(f"--fff-variant: unknown key {key!r}; choose among {known}")
        else:
            overrides.append(f"model.fff.{key}={value}")
    return overrides, terms


def build_contenders(
    dataset: str, seed: int, models: list[str], variants: list[str]
) -> tuple[Any, list[Contender], dict[str, Any], list[str]]:
    """The data set (the preset's, with ``seed``), the contenders, the preset's config, and
    notes on models skipped. Each model's initial weights come from ``torch.manual_seed(seed)``."""
    from freeflows.experiments.config import load_config
    from freeflows.experiments.registry import build_model
    from freeflows.runner.train import build

    cfg = load_config(dataset, [f"seed={seed}"])
    data, _ = build(cfg)
    features = data.event_shape[0]
    contenders: list[Contender] = []
    skipped: list[str] = []

    opts = ", ".join(f"{k}={v}" for k, v in cfg["model"]["fff"].items())
    for kind in models:
        torch.manual_seed(seed)
        if kind == "fff":
            contenders.append(
                fff_contender("fff", build_model(cfg["model"], data.event_shape, None), note=opts)
            )
        elif kind in ("nsf", "maf"):
            contenders.append(zuko_contender(kind, features))
        elif kind == "realnvp":
            rcfg = load_config(dataset, [f"seed={seed}", "model.kind=realnvp"])
            try:
                model = build_model(rcfg["model"], data.event_shape, None)
            except ValueError as err:
                skipped.append(f"freeflows RealNVP: {err}")
                continue
            ropts = ", ".join(f"{k}={v}" for k, v in rcfg["model"]["realnvp"].items())
            contenders.append(exact_flow_contender("freeflows RealNVP", model, note=ropts))
    for spec in variants:
        overrides, terms = _parse_variant(spec, set(cfg["model"]["fff"]))
        vcfg = load_config(dataset, [f"seed={seed}", *overrides])
        torch.manual_seed(seed)
        flow = build_model(vcfg["model"], data.event_shape, None)
        contenders.append(fff_contender(f"fff ({spec.replace(',', ', ')})", flow, **terms, note=spec))
    return data, contenders, cfg, skipped


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate every contender on one (data set, seed, budget)."""
    torch.set_num_threads(1)
    dataset, seed, budget = task["dataset"], task["seed"], task["budget"]
    data, contenders, cfg, skipped = build_contenders(dataset, seed, task["models"], task["fff_variant"])
    settings = TrainSettings(
        lr=task["lr"] or cfg["optim"]["lr"],
        batch_size=cfg["trainer"]["batch_size"],
        grad_clip=cfg["optim"]["grad_clip"],
        cpu_seconds=task["cpu_seconds"],
        steps=task["steps"],
        budget=budget,
        slice_cpu_seconds=task["slice"],
    )
    wall = time.perf_counter()
    trainees = train_side_by_side(contenders, data.train.x, settings, seed)
    rows = []
    for t in trainees:
        c = t.contender
        row: dict[str, Any] = {
            "dataset": dataset,
            "seed": seed,
            "budget": budget,
            "model": c.name,
            "note": c.note,
            "n_params": sum(p.numel() for p in c.model.parameters()),
            "steps": t.steps,
            "cpu_seconds": t.cpu_seconds,
            "nonfinite_batches_skipped": t.nonfinite_total,
            "diverged": t.diverged,
            "final_train_loss": sum(t.last_losses) / max(1, len(t.last_losses)),
            "densities": {
                label: evaluate_density(
                    d,
                    data.test.x,
                    data.true_log_prob,
                    mass_data=data.train.x if task.get("mass", True) else None,
                    keep_values=True,
                )
                for label, d in c.densities.items()
            },
        }
        rows.append(row)
        print(f"  {dataset} seed {seed} {budget}: {_row_summary(row)}", flush=True)
    _pair_with_peer(rows)
    return {
        "dataset": dataset,
        "seed": seed,
        "budget": budget,
        "n_train": len(data.train),
        "n_val": len(data.val),
        "n_test": len(data.test),
        "features": data.event_shape[0],
        "known_density": data.true_log_prob is not None,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "grad_clip": settings.grad_clip,
        "skipped": skipped,
        "wall_seconds": time.perf_counter() - wall,
        "rows": rows,
    }


def _pair_with_peer(rows: list[dict[str, Any]]) -> None:
    """Add to every density of every row ``vs_peer``: its paired difference over test rows from
    the peer's log-density (:func:`peer_baseline.paired_difference`; positive: worse than the
    peer); then drop the per-row values."""
    peer = next((r for r in rows if r["model"] == PEER), None)
    ref = peer["densities"]["log_prob"]["log_q"] if peer else None
    for row in rows:
        for d in row["densities"].values():
            log_q = d.pop("log_q")
            if ref is not None and row is not peer:
                d["vs_peer"] = paired_difference(ref, log_q)


def _primary(row: dict[str, Any]) -> tuple[str, str]:
    """(density label, metric) that ranks a row: its first normalised density; KL if known."""
    dens = row["densities"]
    label = next((k for k, v in dens.items() if v["normalised"]), next(iter(dens)))
    return label, ("kl" if "kl" in dens[label] else "nll")


def _row_summary(row: dict[str, Any]) -> str:
    parts = []
    for label, d in row["densities"].items():
        key = "kl" if "kl" in d else "nll"
        parts.append(f"{label} {key} {d[key]:.4f}±{d[key + '_stderr']:.4f} failed {d['n_failed']}")
    return f"{row['model']}: {row['steps']} steps, {row['cpu_seconds']:.1f} CPU-s; " + "; ".join(parts)


# -- summary over seeds -----------------------------------------------------------------------
def _mean_se(values: list[float], own_se: float) -> tuple[float, float]:
    """Mean, and its standard error over seeds (with one seed: the run's own standard error)."""
    if len(values) == 1:
        return values[0], own_se
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def summarise(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (budget, data set, model, density): mean ± standard error over seeds."""
    groups: dict[tuple[str, str, str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    order: list[tuple[str, str, str, str]] = []
    for task in tasks:
        for row in task["rows"]:
            for label, d in row["densities"].items():
                key = (task["budget"], task["dataset"], row["model"], label)
                if key not in groups:
                    groups[key] = []
                    order.append(key)
                groups[key].append((row, d))
    table = []
    for key in order:
        entries = groups[key]
        budget, dataset, model, label = key
        metric = "kl" if "kl" in entries[0][1] else "nll"
        mean, se = _mean_se([d[metric] for _, d in entries], entries[0][1][f"{metric}_stderr"])
        extra: dict[str, Any] = {}
        if all("mass" in d for _, d in entries):
            extra["mass"], extra["mass_pm"] = _mean_se(
                [d["mass"] for _, d in entries], entries[0][1]["mass_stderr"]
            )
            extra["mass_unsolved"] = [d["mass_unsolved"] for _, d in entries]
            extra["value_mass_normalised"], extra["pm_mass_normalised"] = _mean_se(
                [d[f"{metric}_mass_normalised"] for _, d in entries], entries[0][1][f"{metric}_stderr"]
            )
        if entries and all("vs_peer" in d for _, d in entries):
            extra["vs_peer"], extra["vs_peer_pm"] = _mean_se(
                [d["vs_peer"]["diff"] for _, d in entries], entries[0][1]["vs_peer"]["stderr"]
            )
        table.append(
            {
                **extra,
                "budget": budget,
                "dataset": dataset,
                "model": model,
                "density": label,
                "normalised": entries[0][1]["normalised"],
                "metric": metric,
                "value": mean,
                "pm": se,
                "seeds": sorted(r["seed"] for r, _ in entries),
                "n_failed": [d["n_failed"] for _, d in entries],
                "n_params": entries[0][0]["n_params"],
                "steps": sum(r["steps"] for r, _ in entries) / len(entries),
                "cpu_seconds": sum(r["cpu_seconds"] for r, _ in entries) / len(entries),
                "eval_cpu_seconds": sum(d["eval_cpu_seconds"] for _, d in entries) / len(entries),
                "diverged": sum(bool(r["diverged"]) for r, _ in entries),
            }
        )
    return table


def _versus(a: dict[str, Any], b: dict[str, Any]) -> str:
    """How far ``a`` is behind ``b`` (both ranked entries; ``a`` the worse), with the standard
    error of the difference: paired over test rows (one seed) or over seeds when one of the two
    is the peer and the paired value exists, else unpaired (the two ± combined)."""
    gap = a["value"] - b["value"]
    paired = a if b["model"] == PEER else b if a["model"] == PEER else None
    if paired is not None and "vs_peer" in paired:
        se, how = paired["vs_peer_pm"], "paired"
    else:
        se, how = math.hypot(a["pm"], b["pm"]), "unpaired"
    if not se > 0:
        return f"by {gap:.4f}"
    z = gap / se
    clear = "" if z >= 2 else "; not a clear difference"
    return f"by {gap:.4f} ± {se:.4f} ({z:.1f} standard errors, {how}{clear})"


def verdict(entries: list[dict[str, Any]]) -> str:
    """A plain sentence: which model wins (normalised densities only) and by how much, and how
    the free-form flow's normalised density compares with the peer."""
    ranked = [e for e in entries if e["normalised"] and math.isfinite(e["value"])]
    if not ranked:
        return "No model has a finite normalised density here."
    ranked.sort(key=lambda e: e["value"])
    best, metric = ranked[0], ("KL" if ranked[0]["metric"] == "kl" else "test NLL")
    sentence = f"{best['model']} wins ({metric} {best['value']:.4f} ± {best['pm']:.4f})"
    if len(ranked) > 1:
        second = ranked[1]
        sentence += (
            f", ahead of {second['model']} ({second['value']:.4f} ± {second['pm']:.4f}) "
            f"{_versus(second, best)}"
        )
    sentence += "."
    fff = next((e for e in ranked if e["model"] == "fff"), None)
    peer = next((e for e in ranked if e["model"] == PEER), None)
    if fff and peer and fff["value"] > peer["value"]:
        ratio = (
            f"; its KL is {fff['value'] / peer['value']:.1f}× the peer's"
            if metric == "KL" and peer["value"] > 0
            else ""
        )
        sentence += (
            f" The free-form flow (normalised) loses to {PEER}: {fff['value']:.4f} against "
            f"{peer['value']:.4f}, worse {_versus(fff, peer)}{ratio}."
        )
    elif fff and peer:
        sentence += f" The free-form flow (normalised) beats {PEER} {_versus(peer, fff)}."
    failed = [e for e in entries if e["model"].startswith("fff") and e["normalised"] and any(e["n_failed"])]
    for e in failed:
        sentence += f" {e['model']}: the solve failed on {sum(e['n_failed'])} test rows (over all seeds)."
    return sentence


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    tasks = result["tasks"]
    table = result["table"]
    lines = [
        "# The free-form flow against zuko's neural spline flow on toy data",
        "",
        f"Command: `{s['command']}`",
        "",
        f"torch {s['torch']}, zuko {s['zuko']}, {s['threads']} torch thread per process, "
        f"{s['machine']}; seeds {s['seeds']}. Every model: the same data and split (the preset's, "
        f"with the seed), the same batches, Adam with the preset's peak learning rate and batch size, "
        f"a one-cycle schedule in budget progress, gradient-norm clip, final weights "
        f"(no validation-based selection for any model). Equal CPU time: {s['cpu_seconds']:g} CPU-s "
        f"of `time.process_time()` per model, interleaved in {s['slice']:g}-CPU-s turns. "
        f"Equal steps: {s['steps']} steps per model. {s['workers']} worker process(es), "
        f"{s.get('total_wall_seconds', float('nan')) / 60:.0f} min of wall time"
        + (
            f" (load average {s['load_average_at_start'][0]:.1f} at the start, "
            f"{s['load_average_at_end'][0]:.1f} at the end)."
            if "load_average_at_end" in s
            else "."
        ),
        "",
        "KL is KL(p‖q) = E_p[log p − log q] on the test split; NLL is the test NLL in nats. "
        + (
            "± is the standard error over test rows (one seed)."
            if len(s["seeds"]) == 1
            else "± is the standard error over seeds."
        )
        + " The free-form flow's `log_prob` is the normalised density of its draws (a root solve "
        "g(z) = x from f(x); rows whose solve fails are left out and counted); its `paper` value "
        "log p_Z(f(x)) − log|det J_g(f(x))| is **not normalised** and takes no part in the ranking. "
        "The mass M = ∫q is estimated by the trapezoid rule on a grid over the training data's range "
        "± 3 standard deviations (2001 nodes in 1-D, 201² in 2-D; unsolved points count as zero; ± "
        "is the quadrature's error estimate, or the standard error over seeds); a normalised "
        "density must have M = 1 within it. The last column is the metric of the mass-normalised q/M "
        "(metric + log M); ± inf there means the quadrature's tail bound does not apply (the outer "
        f"shell at the box's edge holds as much mass as the inner one). Δ vs {PEER} is the row's "
        f"metric minus {PEER}'s, paired over test rows (one seed; positive: worse than {PEER}) or "
        "with the standard error over seeds. Steps per CPU-second fall when the shared machine is "
        "loaded (cache and memory contention), for every model alike since they are interleaved: "
        "compare models within a table, not step counts across runs.",
        "",
    ]
    for budget in [b for b in BUDGETS if any(t["budget"] == b for t in tasks)]:
        title = (
            f"Equal CPU time ({s['cpu_seconds']:g} CPU-s per model)"
            if budget == "cpu"
            else f"Equal steps ({s['steps']} per model)"
        )
        lines += [f"## {title}", ""]
        for dataset in [d for d in DATASETS if any(t["dataset"] == d for t in tasks)]:
            mine = [t for t in tasks if t["budget"] == budget and t["dataset"] == dataset]
            if not mine:
                continue
            entries = [e for e in table if e["budget"] == budget and e["dataset"] == dataset]
            metric = "KL(p‖q)" if mine[0]["known_density"] else "test NLL"
            paired = any("vs_peer" in e for e in entries)
            lines += [
                f"### {dataset} ({mine[0]['n_train']} train / {mine[0]['n_test']} test rows, "
                f"{mine[0]['features']}-D, lr {mine[0]['lr']:g}, batch {mine[0]['batch_size']})",
                "",
                f"| model | density | params | steps | CPU-s | {metric} ↓ | failed test rows | eval CPU-s "
                f"| mass M | {metric} of q/M |" + (f" Δ vs {PEER} |" if paired else ""),
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if paired else ""),
            ]
            for e in entries:
                dens = e["density"] + ("" if e["normalised"] else " (not normalised)")
                div = f" ({e['diverged']} diverged)" if e["diverged"] else ""
                lines.append(
                    f"| {e['model']}{div} | {dens} | {e['n_params']:,} | {e['steps']:.0f} | "
                    f"{e['cpu_seconds']:.1f} | {e['value']:.4f} ± {e['pm']:.4f} | "
                    f"{'/'.join(str(n) for n in e['n_failed'])} | {e['eval_cpu_seconds']:.2f} | "
                    + (
                        f"{e['mass']:.3f} ± {e['mass_pm']:.3f} | "
                        f"{e['value_mass_normalised']:.4f} ± {e['pm_mass_normalised']:.4f} |"
                        if "mass" in e
                        else "— | — |"
                    )
                    + (
                        f" {e['vs_peer']:+.4f} ± {e['vs_peer_pm']:.4f} |"
                        if "vs_peer" in e
                        else " — |"
                        if paired
                        else ""
                    )
                )
            skipped = sorted({note for t in mine for note in t["skipped"]})
            lines += [""]
            if skipped:
                lines += ["Skipped: " + "; ".join(skipped) + ".", ""]
            if mine[0]["features"] == 1 and any(e["model"].startswith("zuko") for e in entries):
                lines += [
                    "In 1-D, zuko's masked networks have no inputs, so each transform's parameters are "
                    "free constants: zuko MAF is one affine map of a Gaussian (a single Gaussian), "
                    "zuko NSF a composition of three monotone splines.",
                    "",
                ]
            lines += [verdict(entries), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        if not args.render.is_file():
            print(f"error: --render: {args.render} is not a file", file=sys.stderr)
            return 2
        result = json.loads(args.render.read_text())
        result["table"] = summarise(result["tasks"])
        args.render.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return 0
    try:
        import zuko
    except ImportError:
        print("error: zuko is not installed; pip install 'freeflows[bench]'", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    settings = {
        "command": "python benchmarks/peer_toys.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "datasets": args.datasets,
        "models": args.models,
        "fff_variant": args.fff_variant,
        "budgets": args.budgets,
        "cpu_seconds": args.cpu_seconds,
        "steps": args.steps,
        "slice": args.slice,
        "seeds": args.seeds,
        "lr_override": args.lr,
        "threads": 1,
        "workers": args.workers,
        "load_average_at_start": list(os.getloadavg()),
        "torch": torch.__version__,
        "zuko": zuko.__version__,
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores (shared)",
    }
    jobs = [
        {
            "dataset": dataset,
            "seed": seed,
            "budget": budget,
            "models": args.models,
            "fff_variant": args.fff_variant,
            "cpu_seconds": args.cpu_seconds,
            "steps": args.steps,
            "slice": args.slice,
            "mass": args.mass,
            "lr": args.lr,
        }
        for budget in args.budgets
        for dataset in args.datasets
        for seed in args.seeds
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"settings": settings, "tasks": [], "table": []}
    t0 = time.perf_counter()

    def record(task: dict[str, Any]) -> None:
        result["tasks"].append(task)
        result["tasks"].sort(key=lambda t: (t["budget"], DATASETS.index(t["dataset"]), t["seed"]))
        result["table"] = summarise(result["tasks"])
        settings["total_wall_seconds"] = time.perf_counter() - t0
        settings["load_average_at_end"] = list(os.getloadavg())
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
        (args.out / f"{args.name}.md").write_text(markdown(result))

    if args.workers == 1:
        for job in jobs:
            record(run_task(job))
    else:
        with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
            for task in pool.imap_unordered(run_task, jobs):
                record(task)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
