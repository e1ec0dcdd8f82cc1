r"""Boltzmann generators: free-form EGNN flow (``fff-egnn``) against the equivariant CNF (``ecnf``)
on DW4 and LJ13, at equal CPU-time training budgets, through the runner API.

Every model is trained by :func:`freeflows.runner.train.train` from the shipped presets ``dw4``,
``dw4-ecnf``, ``lj13``, ``lj13-ecnf``; only these fields are overridden: ``seed``,
``trainer.threads``, ``trainer.progress_bar=false`` and ``trainer.max_steps``.

**Budget: CPU time of the training process, one torch thread.** Wall time is unfair on a shared
machine, so the budget ``--cpu-minutes`` counts :func:`time.process_time` of the training steps
(validation passes are excluded and reported apart as ``val_cpu_seconds``). A calibration (one
warm-up step, then the median CPU time of 5 steps) turns the budget into ``trainer.max_steps``, so
that the cosine schedule ends near the budget; the :class:`CpuBudget` callback stops training
when the budget is spent in any case (a model whose steps get slower than calibrated, such as a
CNF whose field stiffens, stops before ``max_steps``). The weights with the best validation NLL
are evaluated (the last ones if no validation ran).

Evaluation: the runner's :func:`freeflows.eval.metrics.evaluate_model` with the sizes below, the same
for both models of a system, on the first ``--test-rows`` rows of the never trained-on test split:

* ``test_nll``: the normalised density (for the free-form flow, the density of its decoder draws,
  from the root solve :math:`g(z^*) = x`; rows whose solve fails are left out and counted in
  ``test_nll_unsolved``), in the :math:`(N-1)d`-dimensional mean-free subspace;
* for the free-form flow, ``test_nll_paper``, the papers' value
  :math:`-\log p_Z(f(x)) + \log\lvert\det J_g(f(x))\rvert` (**not normalised**), its mass
  ``density_mass_paper`` and ``test_nll_paper_normalised`` :math:`= \mathrm{NLL} + \log M`;
* ``density_mass`` of ``log_prob`` (importance sampling with ``--mass-samples`` draws in the
  mean-free subspace; 1 for a normalised density);
* ESS of :math:`\exp(-E - \log q)` over ``--ess-samples`` draws with :math:`\log q` from
  ``sample_and_log_prob`` (the density of the proposal that drew them); mean sample energy;
  sampling time per sample.

The report also quotes each NLL in the convention of the published (bgflow) tables, which leave
out :math:`\tfrac{(N-1)d}{2}\log 2\pi` (5.514 for DW4, 33.082 for LJ13).

Each model writes ``<out>/boltzmann_<preset>.json``; ``--speed SYSTEM`` measures the sampling
speed ratio of a system's two trained models (``boltzmann_speed_<system>.json``); ``--report``
merges everything into ``boltzmann.json`` and ``boltzmann.md``. Histograms are copied to
``<out>/boltzmann_<preset>_{energy,distances}.png``. The models of a system can train in
separate processes at the same time (the budget is CPU time, not wall time):

    python benchmarks/boltzmann.py --presets dw4 --cpu-minutes 6 --mass-samples 2000
    python benchmarks/boltzmann.py --presets dw4-ecnf --cpu-minutes 6 --mass-samples 2000
    python benchmarks/boltzmann.py --speed dw4
    python benchmarks/boltzmann.py --report
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parent
PRESETS = {"dw4": ("dw4", "dw4-ecnf"), "lj13": ("lj13", "lj13-ecnf")}
SYSTEM_OF = {p: s for s, ps in PRESETS.items() for p in ps}
NAME = "boltzmann"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=[], choices=list(SYSTEM_OF), help="models to train")
    p.add_argument("--cpu-minutes", type=float, default=8.0, help="training CPU-time budget per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--test-rows", type=int, default=1000, help="first rows of the test split for the NLL")
    p.add_argument("--ess-samples", type=int, default=1000, help="model draws for ESS and energies")
    p.add_argument("--mass-samples", type=int, default=4000, help="importance draws per mass estimate")
    p.add_argument("--speed", choices=list(PRESETS), help="only measure the sampling speed ratio of a system")
    p.add_argument("--speed-batch", type=int, default=1000)
    p.add_argument("--speed-repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--runs", type=Path, default=Path("runs") / NAME)
    p.add_argument("--report", action="store_true", help="only merge the per-model JSON into the report")
    p.add_argument(
        "--evaluate-only",
        nargs="+",
        default=[],
        choices=list(SYSTEM_OF),
        help="evaluate these presets' trained runs in --runs again (best weights), without training",
    )
    p.add_argument(
        "--replot",
        nargs="+",
        choices=list(PRESETS),
        help="only redraw the histograms of these systems' trained runs (fresh draws, seed --seed)",
    )
    return p.parse_args(argv)


class CpuBudget(Callback):
    """Stop training once the training steps have used ``seconds`` of process CPU time
    (:func:`time.process_time`); CPU time spent in validation passes is not counted and is kept
    in ``val_cpu_seconds``."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.val_cpu_seconds = 0.0
        self.train_cpu_seconds = 0.0
        self._start: float | None = None
        self._val_start: float | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = time.process_time()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._val_start = time.process_time()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._val_start is not None:
            self.val_cpu_seconds += time.process_time() - self._val_start
            self._val_start = None

    def _used(self) -> float:
        return 0.0 if self._start is None else time.process_time() - self._start - self.val_cpu_seconds

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.train_cpu_seconds = self._used()
        if self.train_cpu_seconds >= self.seconds:
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.train_cpu_seconds = self._used()


def calibrate_steps(cfg: dict[str, Any], cpu_seconds: float, repeats: int = 5) -> tuple[int, float]:
    """Steps that fit in ``cpu_seconds`` at the measured CPU time of a training step (one
    warm-up step, then the median of ``repeats``), and that time."""
    from freeflows.runner.train import build

    data, model = build(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["optim"]["lr"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    times = []
    for i in range(repeats + 1):
        x = data.train.x[torch.randint(0, len(data.train), (cfg["trainer"]["batch_size"],), generator=gen)]
        t = time.process_time()
        loss = model.loss(x)
        opt.zero_grad()
        loss.value.backward()
        opt.step()
        if i:
            times.append(time.process_time() - t)
    step = sorted(times)[len(times) // 2]
    return max(10, int(cpu_seconds / step)), step


def _evaluation_sizes(args: argparse.Namespace) -> dict[str, int]:
    """The sizes of :func:`freeflows.eval.metrics.evaluate_model` set by the command line."""
    return {
        "test_rows": args.test_rows,
        "particle_samples": args.ess_samples,
        "mass_samples": args.mass_samples,
    }


def _row_settings(preset: str, cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The report row's settings of a run of ``preset`` with config ``cfg``."""
    return {
        "preset": preset,
        "system": SYSTEM_OF[preset],
        "seed": cfg["seed"],
        "threads": args.threads,
        "cpu_minutes_budget": args.cpu_minutes,
        "test_rows": args.test_rows,
        "ess_samples_requested": args.ess_samples,
        "mass_samples": args.mass_samples,
        "machine": f"{platform.machine()}, torch {torch.__version__}, shared 2-core CPU",
        "kind": cfg["model"]["kind"],
        "model": cfg["model"][cfg["model"]["kind"]],
        "batch_size": cfg["trainer"]["batch_size"],
    }


def train_one(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``preset`` for ``--cpu-minutes`` of CPU time and evaluate it (see the module
    docstring); the row of the report."""
    import freeflows.eval.metrics as fm
    from freeflows.experiments.config import load_config
    from freeflows.runner.train import train

    torch.set_num_threads(args.threads)
    base = [f"seed={args.seed}", f"trainer.threads={args.threads}", "trainer.progress_bar=false"]
    cfg = load_config(preset, base)
    budget = 60 * args.cpu_minutes
    steps, step_cpu = calibrate_steps(cfg, budget)
    cfg = load_config(preset, [*base, f"trainer.max_steps={steps}"])
    run = args.runs / preset
    if run.exists():
        shutil.rmtree(run)
    cpu_eval = {"seconds": 0.0}

    def evaluate(*a: Any, **kw: Any) -> dict[str, Any]:
        t = time.process_time()
        out = evaluate_sized(*a, **kw)
        cpu_eval["seconds"] = time.process_time() - t
        return out

    evaluate_sized = functools.partial(fm.evaluate_model, **_evaluation_sizes(args))
    stopper = CpuBudget(budget)
    t, c = time.perf_counter(), time.process_time()
    with mock.patch.object(fm, "evaluate_model", evaluate):
        train(cfg, run, callbacks=[stopper])
    total, total_cpu = time.perf_counter() - t, time.process_time() - c
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("energy", "distances"):
        src = run / f"{name}.png"
        if src.is_file():
            shutil.copy(src, args.out / f"{NAME}_{preset}_{name}.png")
    return {
        **_row_settings(preset, cfg, args),
        "planned_steps": steps,
        "calibrated_step_cpu_seconds": step_cpu,
        "train_cpu_seconds": stopper.train_cpu_seconds,
        "val_cpu_seconds": stopper.val_cpu_seconds,
        "eval_cpu_seconds": cpu_eval["seconds"],
        "cpu_seconds_train_and_eval": total_cpu,
        "wall_seconds_train_and_eval": total,
        "run_dir": str(run),
        **metrics,
    }


def evaluate_trained(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the best weights of a run that :func:`train_one` trained (for example one whose
    evaluation was interrupted) with the sizes of ``args``; the training fields that only the
    training process measured (CPU seconds) are ``None``, the steps come from the run's log."""
    import csv

    import freeflows.eval.metrics as fm
    from freeflows.runner.train import load_run

    torch.set_num_threads(args.threads)
    run = args.runs / preset
    cfg, data, model = load_run(run)
    with (run / "metrics.csv").open() as fh:
        steps = max(int(row[0]) for row in csv.reader(fh) if row and row[0].isdigit())
    t, c = time.perf_counter(), time.process_time()
    metrics = fm.evaluate_model(model, data, **_evaluation_sizes(args))
    cpu, wall = time.process_time() - c, time.perf_counter() - t
    return {
        **_row_settings(preset, cfg, args),
        "planned_steps": cfg["trainer"]["max_steps"],
        "calibrated_step_cpu_seconds": None,
        "train_cpu_seconds": None,
        "val_cpu_seconds": None,
        "eval_cpu_seconds": cpu,
        "cpu_seconds_train_and_eval": None,
        "wall_seconds_train_and_eval": None,
        "evaluated_separately": True,
        "eval_wall_seconds": wall,
        "run_dir": str(run),
        "steps": steps,
        **metrics,
    }


def sampling_ratio(presets: tuple[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Median CPU time (:func:`time.process_time`, one thread) of ``sample(batch)`` of each
    trained model, interleaved repeats."""
    from freeflows.runner.train import load_run

    models = [load_run(args.runs / p)[2] for p in presets]
    times: list[list[float]] = [[], []]
    with torch.no_grad():
        for m in models:  # warm-up
            m.sample(16)
        for _ in range(args.speed_repeats):
            for i, m in enumerate(models):
                t = time.process_time()
                m.sample(args.speed_batch)
                times[i].append(time.process_time() - t)
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


def run_preset(preset: str, args: argparse.Namespace) -> None:
    """Train and evaluate one preset; write ``<out>/boltzmann_<preset>.json``."""
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"[{preset}] training for {args.cpu_minutes} CPU-minutes", flush=True)
    row = train_one(preset, args)
    (args.out / f"{NAME}_{preset}.json").write_text(json.dumps(row, indent=2))
    print(f"[{preset}] done: {row['steps']} steps, test NLL {row['test_nll']:.3f}", flush=True)


def run_speed(system: str, args: argparse.Namespace) -> None:
    """Sampling-speed ratio of a system's two trained runs; write ``boltzmann_speed_<system>.json``."""
    torch.set_num_threads(args.threads)
    out = {"system": system, **sampling_ratio(PRESETS[system], args)}
    (args.out / f"{NAME}_speed_{system}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def bgflow_offset(nll_dims: int) -> float:
    r""":math:`\tfrac m2 \log 2\pi` for an :math:`m = (N-1)d`-dimensional density: the constant
    that the published (bgflow) tables leave out of the NLL (5.514 for DW4, 33.082 for LJ13)."""
    return nll_dims / 2 * math.log(2 * math.pi)


def _pm(r: dict[str, Any], key: str, spec: str = ".2f") -> str:
    value = r.get(key)
    if value is None:
        return "–"
    err = r.get(f"{key}_stderr")
    return format(value, spec) if err is None else f"{format(value, spec)} ± {format(err, spec)}"


def _shift(r: dict[str, Any], key: str) -> str:
    value = r.get(key)
    return "–" if value is None else f"{value - bgflow_offset(r['nll_dims']):.2f}"


MODEL_NAMES = {"fff-egnn": "free-form flow (EGNN)", "ecnf": "equivariant CNF"}


def report(args: argparse.Namespace) -> None:
    """Merge the per-model and speed JSON files into ``boltzmann.json`` and ``boltzmann.md``."""
    rows, speeds = [], []
    for system, presets in PRESETS.items():
        for preset in presets:
            path = args.out / f"{NAME}_{preset}.json"
            if path.is_file():
                row = json.loads(path.read_text())
                if "preset" in row:
                    rows.append(row)
        path = args.out / f"{NAME}_speed_{system}.json"
        if path.is_file():
            speeds.append(json.loads(path.read_text()))
    (args.out / f"{NAME}.json").write_text(json.dumps({"rows": rows, "sampling": speeds}, indent=2))
    name = {r["preset"]: f"{r['system'].upper()} | {MODEL_NAMES.get(r['kind'], r['kind'])}" for r in rows}
    settings = [
        f"- `{r['preset']}`: seed {r['seed']}, {r['cpu_minutes_budget']:g} CPU-minutes of training, "
        f"{r['threads']} thread; test NLL on the first {r['n_test']} test rows, mass from "
        f"{r.get('density_mass_evaluations', '–')} importance draws, ESS over {r.get('ess_samples', '–')} "
        f"draws; {r['machine']}"
        for r in rows
    ]
    training = [
        "| system | model | params | steps (planned) | train CPU s | validation CPU s | evaluation CPU s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    training += [
        f"| {name[r['preset']]} | {r['n_params']:,} | {r['steps']} ({r['planned_steps']}) | "
        f"{_fmt(r['train_cpu_seconds'], '.0f')} | {_fmt(r['val_cpu_seconds'], '.0f')} | "
        f"{r['eval_cpu_seconds']:.0f} |"
        for r in rows
    ]
    nll = [
        "| system | model | test NLL, normalised (unsolved / rows) | same, bgflow convention | "
        "paper value, **not normalised** | same, bgflow convention | paper value + log mass |",
        "|---|---|---|---|---|---|---|",
    ]
    nll += [
        f"| {name[r['preset']]} | {_pm(r, 'test_nll')} ({r['test_nll_unsolved']} / {r['n_test']}) | "
        f"{_shift(r, 'test_nll')} | {_pm(r, 'test_nll_paper')} | {_shift(r, 'test_nll_paper')} | "
        f"{_pm(r, 'test_nll_paper_normalised')} |"
        for r in rows
    ]
    mass = [
        "| system | model | mass of `log_prob` (unsolved / draws) | mass of the paper value | "
        "ESS (draws, dropped) | sample energy mean / median (data mean) | µs / sample |",
        "|---|---|---|---|---|---|---:|",
    ]
    for r in rows:
        paper = "–"
        if r.get("density_mass_paper") is not None:
            paper = _pm(r, "density_mass_paper", ".3g")
        ess = "–" if r.get("ess") is None else f"{r['ess']:.4f}"
        mass.append(
            f"| {name[r['preset']]} | {_pm(r, 'density_mass', '.3g')} "
            f"({r.get('density_mass_unsolved', '–')} / {r.get('density_mass_evaluations', '–')}) | {paper} | "
            f"{ess} ({r.get('ess_samples', '–')}, {r.get('ess_dropped', '–')}) | "
            f"{_fmt(r.get('sample_energy_mean'), '.3g')} / {_fmt(r.get('sample_energy_median'), '.3g')} "
            f"({r['data_energy_mean']:.1f}) | {1e6 * r['sample_seconds_per_sample']:.0f} |"
        )
    speed = ["| system | batch | free-form flow CPU s | CNF CPU s | CNF NFE per solve | CNF / free-form |"]
    speed += ["|---|---:|---:|---:|---:|---:|"]
    speed += [
        f"| {sp['system'].upper()} | {sp['batch']} | {sp['fff_seconds']:.4f} | {sp['ecnf_seconds']:.3f} | "
        f"{_fmt(sp.get('ecnf_sample_nfe'), 'd')} | {sp['ecnf_over_fff']:.0f}× ({sp['repeats']} repeats) |"
        for sp in speeds
    ]
    text = "\n".join([*settings, "", *training, "", *nll, "", *mass, "", *speed, ""])
    (args.out / f"{NAME}.md").write_text(text)
    print(text)


def replot(args: argparse.Namespace) -> None:
    """Redraw the energy and distance histograms of every trained run of ``--replot``."""
    from freeflows.runner.train import load_run, write_plots

    for system in args.replot:
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
    if args.speed:
        run_speed(args.speed, args)
        return
    for preset in args.presets:
        run_preset(preset, args)
    for preset in args.evaluate_only:
        args.out.mkdir(parents=True, exist_ok=True)
        row = evaluate_trained(preset, args)
        (args.out / f"{NAME}_{preset}.json").write_text(json.dumps(row, indent=2))
        print(f"[{preset}] evaluated: test NLL {row['test_nll']:.3f}", flush=True)
    report(args)


if __name__ == "__main__":
    main()
