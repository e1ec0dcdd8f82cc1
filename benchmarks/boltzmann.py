"""Boltzmann generators: free-form EGNN flow (``fff-egnn``) against the equivariant CNF (``ecnf``)
on DW4 and LJ13, at equal wall-clock training budgets, through the runner API.

Every model is trained by :func:`freeflows.runner.train.train` from the shipped presets ``dw4``,
``dw4-ecnf``, ``lj13``, ``lj13-ecnf``; only these fields are overridden: ``seed``,
``trainer.threads``, ``trainer.progress_bar=false`` and ``trainer.max_steps``. The budget is wall
time: a short calibration (3 timed training steps after one warm-up) turns ``--minutes`` into
``trainer.max_steps`` (so the cosine schedule ends near the budget), and Lightning's ``Timer``
callback stops training at ``--minutes`` in any case (it counts validation time too). The weights
with the best validation NLL are evaluated (the last ones if no validation ran).

Evaluation (the runner's :func:`freeflows.metrics.evaluate_model`, with the sizes below, the same
for both models of a system): exact test NLL on the first ``--test-rows`` rows of the never
trained-on test split, in the :math:`(N-1)d`-dimensional mean-free subspace; ESS of
:math:`\\exp(-E - \\log q)` over ``--ess-samples`` model draws with exact ``log_prob``; mean sample
energy; sampling time per sample. Then the sampling-speed ratio of the two trained models at equal
batch size (``--speed-batch``), from ``--speed-repeats`` interleaved repeats (median each).

Each system writes ``<out>/boltzmann_<system>.json``; ``--report`` merges them into
``boltzmann.json`` and ``boltzmann.md``. Histograms are copied to
``<out>/boltzmann_<preset>_{energy,distances}.png``.

    python benchmarks/boltzmann.py --systems dw4 --minutes 6 --test-rows 1000 --ess-samples 1000
    python benchmarks/boltzmann.py --systems lj13 --minutes 6 --test-rows 100 --ess-samples 100
    python benchmarks/boltzmann.py --report
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent
PRESETS = {"dw4": ("dw4", "dw4-ecnf"), "lj13": ("lj13", "lj13-ecnf")}
NAME = "boltzmann"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", nargs="+", default=["dw4"], choices=list(PRESETS))
    p.add_argument("--minutes", type=float, default=6.0, help="wall-clock training budget per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--test-rows", type=int, default=1000, help="first rows of the test split for the NLL")
    p.add_argument("--ess-samples", type=int, default=1000, help="model draws for ESS and energies")
    p.add_argument("--speed-batch", type=int, default=1000)
    p.add_argument("--speed-repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--runs", type=Path, default=Path("runs") / NAME)
    p.add_argument("--report", action="store_true", help="only merge the per-system JSON into the report")
    p.add_argument(
        "--replot",
        action="store_true",
        help="only redraw the histograms of the trained runs (fresh draws, seed --seed) and copy them",
    )
    p.add_argument(
        "--only",
        choices=["fff-egnn", "ecnf"],
        help="train only this model kind; the other's row is kept from the system's existing JSON",
    )
    return p.parse_args(argv)


def calibrate_steps(cfg: dict[str, Any], minutes: float) -> tuple[int, float]:
    """Steps that fit in ``minutes`` at the measured time of a training step (one warm-up step,
    then the median of 3), and that time."""
    from freeflows.runner.train import build

    data, model = build(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["optim"]["lr"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    times = []
    for i in range(4):
        x = data.train.x[torch.randint(0, len(data.train), (cfg["trainer"]["batch_size"],), generator=gen)]
        t = time.perf_counter()
        loss = model.loss(x)
        opt.zero_grad()
        loss.value.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
    step = sorted(times)[1]
    return max(10, int(minutes * 60 / step)), step


def train_one(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    from lightning.pytorch.callbacks import Timer

    import freeflows.metrics as fm
    from freeflows.experiments.config import load_config
    from freeflows.runner.train import train

    torch.set_num_threads(args.threads)
    base = [f"seed={args.seed}", f"trainer.threads={args.threads}", "trainer.progress_bar=false"]
    cfg = load_config(preset, base)
    steps, step_seconds = calibrate_steps(cfg, args.minutes)
    cfg = load_config(preset, [*base, f"trainer.max_steps={steps}"])
    run = args.runs / preset
    if run.exists():
        shutil.rmtree(run)
    evaluate = functools.partial(
        fm.evaluate_model, test_rows=args.test_rows, particle_samples=args.ess_samples
    )
    t = time.perf_counter()
    with mock.patch.object(fm, "evaluate_model", evaluate):
        train(cfg, run, callbacks=[Timer(duration=timedelta(minutes=args.minutes), interval="step")])
    total = time.perf_counter() - t
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("energy", "distances"):
        src = run / f"{name}.png"
        if src.is_file():
            shutil.copy(src, args.out / f"{NAME}_{preset}_{name}.png")
    return {
        "preset": preset,
        "kind": cfg["model"]["kind"],
        "model": cfg["model"][cfg["model"]["kind"]],
        "batch_size": cfg["trainer"]["batch_size"],
        "planned_steps": steps,
        "calibrated_step_seconds": step_seconds,
        "wall_seconds_train_and_eval": total,
        "run_dir": str(run),
        **metrics,
    }


def sampling_ratio(presets: tuple[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Median time of ``sample(batch)`` of each trained model, interleaved repeats."""
    from freeflows.runner.train import load_run

    models = [load_run(args.runs / p)[2] for p in presets]
    times: list[list[float]] = [[], []]
    with torch.no_grad():
        for m in models:  # warm-up
            m.sample(16)
        for _ in range(args.speed_repeats):
            for i, m in enumerate(models):
                t = time.perf_counter()
                m.sample(args.speed_batch)
                times[i].append(time.perf_counter() - t)
        nfe = None
        if hasattr(models[1], "reset_nfe"):
            models[1].reset_nfe()
            models[1].sample(args.speed_batch)
            nfe = models[1].nfe_sample
    med = [sorted(ts)[len(ts) // 2] for ts in times]
    return {
        "batch": args.speed_batch,
        "repeats": args.speed_repeats,
        "fff_seconds": med[0],
        "ecnf_seconds": med[1],
        "ecnf_over_fff": med[1] / med[0],
        "ecnf_sample_nfe": nfe,
    }


def run_system(system: str, args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{NAME}_{system}.json"
    result: dict[str, Any] = {
        "system": system,
        "seed": args.seed,
        "threads": args.threads,
        "minutes_per_model": args.minutes,
        "test_rows": args.test_rows,
        "ess_samples": args.ess_samples,
        "machine": f"{platform.machine()}, torch {torch.__version__}, shared 2-core CPU",
        "rows": [],
    }
    kept = {}
    if args.only:
        if not out.is_file():
            raise SystemExit(f"--only {args.only}: {out} has no earlier rows to keep")
        kept = {r["preset"]: r for r in json.loads(out.read_text())["rows"]}
    for preset in PRESETS[system]:
        kind = "ecnf" if preset.endswith("-ecnf") else "fff-egnn"
        if args.only and kind != args.only:
            if preset not in kept:
                raise SystemExit(f"--only {args.only}: {out} has no row of {preset} to keep")
            print(f"[{system}] keeping the earlier {preset} row", flush=True)
            result["rows"].append({**kept[preset], "kept_from_earlier_run": True})
            continue
        print(f"[{system}] training {preset} for {args.minutes} min", flush=True)
        result["rows"].append(train_one(preset, args))
        out.write_text(json.dumps(result, indent=2))
    print(f"[{system}] sampling-speed ratio", flush=True)
    result["sampling"] = sampling_ratio(PRESETS[system], args)
    out.write_text(json.dumps(result, indent=2))


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def report(args: argparse.Namespace) -> None:
    systems = []
    for system in PRESETS:
        path = args.out / f"{NAME}_{system}.json"
        if path.is_file():
            systems.append(json.loads(path.read_text()))
    (args.out / f"{NAME}.json").write_text(json.dumps(systems, indent=2))
    lines = [
        "| system | model | steps | train s | test NLL (rows) | ESS (draws, dropped) | "
        "sample energy mean / median (data) | sample ms / 1000 | params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in systems:
        for r in s["rows"]:
            lines.append(
                f"| {s['system']} | {r['kind']} | {r['steps']} | {r['train_seconds']:.0f} | "
                f"{r['test_nll']:.2f} ± {r['test_nll_stderr']:.2f} ({r['n_test']}) | "
                f"{_fmt(r.get('ess'), '.4f')} ({r['ess_samples']}, {r['ess_dropped']}) | "
                f"{_fmt(r.get('sample_energy_mean'), '.1f')} / {_fmt(r.get('sample_energy_median'), '.1f')} "
                f"({r['data_energy_mean']:.1f}) | {1e6 * r['sample_seconds_per_sample']:.1f} | "
                f"{r['n_params']} |"
            )
    lines += ["", "| system | batch | fff s | ecnf s | ecnf / fff (median of interleaved repeats) |"]
    lines += ["|---|---|---|---|---|"]
    for s in systems:
        sp = s.get("sampling")
        if sp:
            lines.append(
                f"| {s['system']} | {sp['batch']} | {sp['fff_seconds']:.3f} | {sp['ecnf_seconds']:.3f} | "
                f"{sp['ecnf_over_fff']:.0f}x ({sp['repeats']} repeats) |"
            )
    settings = [
        f"- {s['system']}: seed {s['seed']}, {s['minutes_per_model']} min wall-clock training per model, "
        f"{s['threads']} thread, test NLL on the first {s['test_rows']} test rows, ESS over "
        f"{s['ess_samples']} draws; {s['machine']}"
        for s in systems
    ]
    (args.out / f"{NAME}.md").write_text("\n".join([*settings, "", *lines, ""]))
    print("\n".join(lines))


def replot(args: argparse.Namespace) -> None:
    """Redraw the energy and distance histograms of every trained run of ``--systems``."""
    from freeflows.runner.train import load_run, write_plots

    for system in args.systems:
        for preset in PRESETS[system]:
            run = args.runs / preset
            _, data, model = load_run(run)
            torch.manual_seed(args.seed)
            for path in write_plots(run, model, data):
                if path.stem in ("energy", "distances"):
                    shutil.copy(path, args.out / f"{NAME}_{preset}_{path.stem}.png")
            print(f"[{system}] redrew the histograms of {run}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        replot(args)
        return
    if args.report:
        report(args)
        return
    for system in args.systems:
        run_system(system, args)
    report(args)


if __name__ == "__main__":
    main()
