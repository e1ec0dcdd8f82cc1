"""Select the SBI presets' β and refinement on validation data, never on the C2ST it reports.

For each task (``--tasks``; default: every sbibm task with an ``sbi-<task>`` preset) and each β
(``--betas``; default: the preset's ``model.fff.beta``), at one simulation budget and seed:

1. **train** the preset's conditional free-form flow once with :func:`freeflows.experiments.sbi.run_sbi`,
   with ``model.fff.sample_refine_steps`` = K, the preset's K if it is above 0, else 20. Training
   then logs ``val/nll`` of the encoder density and keeps the checkpoint with the best one, as a
   preset with K > 0 does. The refined draws are scored by C2ST (batched classifier) on sbibm's
   observations (``sbi_c2st_k<K>.json`` in the run directory);
2. **score one decoder pass**: the same checkpoint sampled with K = 0 (``run_sbi(reuse=True)``:
   the refinement steps only change sampling), C2ST in ``sbi_c2st_k0.json``;
3. **validation statistics** of the best checkpoint on the run's validation split (10 % of the
   budget, drawn from the prior predictive; sbibm's observations are never used), for the
   decoder density (that of one decoder pass) and the encoder density (that of refined draws):
   the NLL (:func:`freeflows.eval.metrics.nll_summary`; rows whose decoder root solve fails are
   NaN, left out and counted) and the mass ∫ q(θ | x) dθ on the first validation conditions
   (:func:`freeflows.eval.metrics.model_density_mass`: quadrature up to 2-D θ, importance
   sampling above), in ``selection_val.json``.

Each (task, β, K) gives one row of ``<out>/sbi_selection.jsonl``; a row replaces the file's row
with the same task, budget, seed, β and K, and every other row is kept. A row is scored by the
validation NLL of the density its draws follow (encoder for K > 0, decoder for K = 0). It is
*trusted* when that density's mass is one within ``max(3 s.e., 0.05)`` and, for the decoder,
the solve failed on at most 5 % of the validation rows; per task (budget and seed) the trusted
row with the lowest validation NLL is selected (:func:`select`), and none when no row is
trusted. ``<out>/sbi_selection.md`` shows every row of the file per task, the selected setting,
the preset's current setting and the difference of their C2STs. Both files are rewritten after
every (task, β). Protocol: ``docs/sbi-selection.md``.

    python benchmarks/sbi_selection.py --tasks slcp --betas 10 30 100
    python benchmarks/sbi_selection.py --tasks slcp --c2st selected --set trainer.max_steps=20000

``--c2st selected`` scores C2ST only for each task's selected setting (and only if the results
file has none for it), so that a sweep costs its trainings and validation statistics.
``--set KEY=VALUE`` adds a config override, such as a step cap, to every run of the call; such a
run has its own directory and rows, and competes in the selection like another β.

``--reuse`` skips every step whose output is already in the run directory (a trained model is
sampled again instead of trained again). ``--quick`` is a smoke test (budget 1,000, 60 steps,
observation 1, 500 draws, a small mass estimate) that writes to ``runs/sbi_selection-quick``
unless ``--out`` and ``--runs`` say otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
NAME = "sbi_selection"
#: refinement steps of the training run when the preset samples with one decoder pass
TRAIN_REFINE_STEPS = 20
#: a density is normalised when its mass is one within max(MASS_SIGMAS s.e., MASS_TOLERANCE)
MASS_SIGMAS = 3.0
MASS_TOLERANCE = 0.05
#: a decoder row is usable when its root solve failed on at most this fraction of validation rows
MAX_UNSOLVED_FRACTION = 0.05
#: the C2ST classifier (sbibm's algorithm, all observations at once)
CLASSIFIER = "batched"
#: the identity of a row: a new row replaces an old one with the same values of these (and ``--set``)
KEY = ("task", "budget", "seed", "beta", "sample_refine_steps")
VAL_FILE = "selection_val.json"
#: the β that C2ST on sbibm's observations had chosen (``benchmarks/results/sbi_fff_sweep.md``),
#: where validation later chose another; the other tasks' β was never tuned on C2ST
C2ST_TUNED_BETA = {"two_moons": 300.0, "gaussian_mixture": 300.0, "slcp": 30.0, "slcp_distractors": 30.0}
#: the training time of a run trained without a C2ST (``--c2st selected``)
TRAIN_FILE = "selection_train.json"


@dataclass(frozen=True)
class Sizes:
    """What one run costs: budget, sampling and the mass estimate, and extra config overrides."""

    budget: int
    observations: tuple[int, ...]
    num_samples: int
    mass_conditions: int
    mass_evaluations: int
    overrides: tuple[str, ...] = ()


FULL = Sizes(10000, tuple(range(1, 11)), 10000, 2, 2 * 101**2)
QUICK = Sizes(1000, (1,), 500, 1, 21**2, ("trainer.max_steps=60", "trainer.max_epochs=10"))


def preset_settings(task: str) -> tuple[float, int]:
    """The preset ``sbi-<task>``'s β and ``sample_refine_steps``."""
    from freeflows.experiments.config import load_config
    from freeflows.experiments.sbi import preset_name

    fff = load_config(preset_name(task))["model"]["fff"]
    return float(fff["beta"]), int(fff["sample_refine_steps"])


def is_preset(row: dict[str, Any]) -> bool:
    """Whether ``row`` is the preset ``sbi-<task>`` as it is now: its β and refinement, no override
    that changes the preset, and no more steps than the preset's cap."""
    from freeflows.experiments.config import load_config
    from freeflows.experiments.sbi import preset_name

    cfg = load_config(preset_name(row["task"]))
    fff = cfg["model"]["fff"]
    if (row["beta"], row["sample_refine_steps"]) != (float(fff["beta"]), int(fff["sample_refine_steps"])):
        return False
    overrides = list(row.get("overrides") or ())
    if overrides and load_config(preset_name(row["task"]), overrides) != cfg:
        return False
    return row.get("steps") is None or row["steps"] <= cfg["trainer"]["max_steps"]


def tasks_with_presets() -> list[str]:
    from freeflows.data.sbi import TASKS
    from freeflows.experiments.config import preset_dir

    return [t for t in TASKS if (preset_dir() / f"sbi-{t}.yaml").is_file()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=None, help="sbibm tasks (default: every task with a preset)")
    p.add_argument("--betas", type=float, nargs="+", default=None, help="β values (default: the preset's)")
    p.add_argument("--budget", type=int, default=None, help=f"simulations (default {FULL.budget})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--observations", type=int, nargs="+", default=None, help="sbibm observations (1..10)")
    p.add_argument("--num-samples", type=int, default=None, help="posterior draws per observation")
    p.add_argument("--quick", action="store_true", help="a smoke test: tiny budget, training and evaluation")
    p.add_argument("--out", type=Path, default=None, help="directory of the JSONL and Markdown")
    p.add_argument("--runs", type=Path, default=None, help="directory of the run directories")
    p.add_argument("--reuse", action="store_true", help="skip the steps whose outputs already exist")
    p.add_argument(
        "--c2st",
        choices=("every", "selected"),
        default="every",
        help="score C2ST for every setting (default), or only for each task's selected setting "
        "when the results file has no C2ST of it (a β sweep at a fraction of the cost)",
    )
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another config override for every run, e.g. trainer.max_steps=20000 (a setting of its "
        "own: its own run directory and rows); β and the refinement steps have their own options",
    )
    args = p.parse_args(argv)

    available = tasks_with_presets()
    args.tasks = args.tasks or available
    for task in args.tasks:
        if task not in available:
            p.error(f"unknown task {task!r} (no sbi-<task> preset); choose from: {', '.join(available)}")
    for beta in args.betas or []:
        if not math.isfinite(beta) or beta <= 0:
            p.error(f"--betas must be positive, got {beta:g}")
    base = QUICK if args.quick else FULL
    args.sizes = Sizes(
        budget=base.budget if args.budget is None else args.budget,
        observations=base.observations if args.observations is None else tuple(args.observations),
        num_samples=base.num_samples if args.num_samples is None else args.num_samples,
        mass_conditions=base.mass_conditions,
        mass_evaluations=base.mass_evaluations,
        overrides=base.overrides,
    )
    from freeflows.experiments.config import load_config
    from freeflows.experiments.sbi import check_arguments, preset_name

    s = args.sizes
    args.settings = tuple(args.settings)
    for setting in args.settings:
        key = setting.partition("=")[0].strip()
        if key in ("model.fff.beta", "model.fff.sample_refine_steps", "seed") or key.startswith("data."):
            p.error(f"--set {setting}: use --betas, --budget or --seed; refinement is scored both ways")
    try:
        check_arguments(args.tasks[0], s.budget, "fff", list(s.observations), s.num_samples, "none")
        for task in args.tasks:
            load_config(preset_name(task), list(args.settings))
    except (ValueError, KeyError) as err:
        p.error(str(err))
    default_runs = Path("runs") / (f"{NAME}-quick" if args.quick else NAME)
    args.runs = args.runs or default_runs
    # a smoke test never writes into the results of the real runs unless told to
    args.out = args.out or (default_runs if args.quick else ROOT / "results")
    return args


def run_dir_of(task: str, beta: float, args: argparse.Namespace) -> Path:
    tag = "".join(f"-{''.join(c for c in o.rpartition('.')[2] if c.isalnum())}" for o in args.settings)
    return args.runs / f"{task}-b{beta:g}-n{args.sizes.budget}-s{args.seed}{tag}"


def train_refine_steps(task: str) -> int:
    """K of the training run: the preset's if it refines, else :data:`TRAIN_REFINE_STEPS`."""
    return preset_settings(task)[1] or TRAIN_REFINE_STEPS


def sbi_overrides(beta: float, k: int, sizes: Sizes, settings: tuple[str, ...] = ()) -> list[str]:
    return [
        f"model.fff.beta={beta}",
        f"model.fff.sample_refine_steps={k}",
        "trainer.plot=false",
        "trainer.progress_bar=false",
        *sizes.overrides,
        *settings,
    ]


def _c2st_done(path: Path, sizes: Sizes) -> bool:
    """Whether ``path`` holds a C2ST of these observations and draws."""
    if not path.is_file():
        return False
    c2st = json.loads(path.read_text())
    observations = tuple(o["observation"] for o in c2st["observations"])
    return observations == sizes.observations and c2st["num_samples"] == sizes.num_samples


def check_reusable(task: str, beta: float, k: int, args: argparse.Namespace) -> None:
    """With ``--reuse``: raise ``ValueError`` if the run directory holds a model trained with
    another config (apart from the sampling options), whose outputs must not be reused."""
    from freeflows.experiments.config import load_config
    from freeflows.experiments.sbi import preset_name, trained_run_differences

    run_dir, s = run_dir_of(task, beta, args), args.sizes
    over = [f"data.n_train={s.budget}", f"seed={args.seed}", *sbi_overrides(beta, k, s, args.settings)]
    differences = trained_run_differences(run_dir, load_config(preset_name(task), over))
    if differences:
        raise ValueError(
            f"--reuse: the model in {run_dir} was trained with a different config "
            f"({', '.join(differences[:5])}); drop --reuse to train again, or give another --runs"
        )


def drop_outputs(run_dir: Path) -> None:
    """Before a new training in ``run_dir``: delete what the old one left (a fresh training starts
    metrics.csv anew itself)."""
    if run_dir.is_dir():
        for stale in ("metrics.json", VAL_FILE, TRAIN_FILE, *(p.name for p in run_dir.glob("sbi_c2st*"))):
            (run_dir / stale).unlink(missing_ok=True)


def score(task: str, beta: float, k: int, args: argparse.Namespace, train: bool) -> None:
    """Train (``train``) or load the run of (task, β) and score its draws with K refinement steps;
    the C2ST goes to ``sbi_c2st_k<K>.json``."""
    from freeflows.experiments.sbi import run_sbi

    run_dir, s = run_dir_of(task, beta, args), args.sizes
    target = run_dir / f"sbi_c2st_k{k}.json"
    if args.reuse and _c2st_done(target, s):
        print(f"{task} β {beta:g} K {k}: reused {target}", flush=True)
        return
    reuse = not train or (args.reuse and (run_dir / "metrics.json").is_file())
    if not reuse:
        drop_outputs(run_dir)
    doing = "scoring the trained model" if reuse else "training"
    print(f"{task} β {beta:g} K {k}: {doing} -> {run_dir}", flush=True)
    start = time.perf_counter()
    result = run_sbi(
        task,
        s.budget,
        method="fff",
        seed=args.seed,
        out=run_dir,
        overrides=sbi_overrides(beta, k, s, args.settings),
        c2st_classifier=CLASSIFIER,
        plots="none",
        num_samples=s.num_samples,
        observations=list(s.observations),
        reuse=reuse,
        log=lambda _: None,
    )
    shutil.copyfile(run_dir / "sbi_c2st.json", target)
    seconds = time.perf_counter() - start
    print(f"{task} β {beta:g} K {k}: mean C2ST {result['mean_c2st']:.4f} ({seconds:.0f} s)", flush=True)


def train_only(task: str, beta: float, k: int, args: argparse.Namespace) -> None:
    """Train the run of (task, β) with K refinement steps and no C2ST (``--c2st selected``); its
    training time goes to ``selection_train.json``. With ``--reuse`` a finished run is kept."""
    from freeflows.experiments.sbi import train_fff

    run_dir, s = run_dir_of(task, beta, args), args.sizes
    reuse = args.reuse and (run_dir / "metrics.json").is_file()
    if reuse:
        print(f"{task} β {beta:g} K {k}: reused the trained model in {run_dir}", flush=True)
    else:
        drop_outputs(run_dir)
        print(f"{task} β {beta:g} K {k}: training (no C2ST) -> {run_dir}", flush=True)
    _, info = train_fff(
        task, s.budget, args.seed, run_dir, sbi_overrides(beta, k, s, args.settings), reuse=reuse
    )
    if not reuse:
        (run_dir / TRAIN_FILE).write_text(json.dumps({"train_seconds": info["train_seconds"]}))
        print(f"{task} β {beta:g} K {k}: trained in {info['train_seconds']:.0f} s", flush=True)


def best_logged_step(run_dir: Path) -> int | None:
    """The step of the lowest finite ``val/nll`` in the run's long-format ``metrics.csv``."""
    from freeflows.plots.density import read_curves

    steps, values = read_curves(run_dir / "metrics.csv").get("val/nll", ([], []))
    finite = [(v, t) for t, v in zip(steps, values, strict=True) if math.isfinite(v)]
    return min(finite)[1] if finite else None


def validation_stats(task: str, beta: float, args: argparse.Namespace) -> dict[str, Any]:
    """NLL and mass of the decoder and encoder densities of the best checkpoint on the validation
    split (``selection_val.json`` in the run directory, reused with ``--reuse``)."""
    run_dir, s = run_dir_of(task, beta, args), args.sizes
    path = run_dir / VAL_FILE
    mass_settings = {"conditions": s.mass_conditions, "evaluations": s.mass_evaluations}
    if args.reuse and path.is_file():
        stats = json.loads(path.read_text())
        if stats["mass_settings"] == mass_settings:
            print(f"{task} β {beta:g}: reused {path}", flush=True)
            return stats
    import torch

    from freeflows.eval.metrics import batched_log_prob, model_density_mass, nll_summary
    from freeflows.runner.train import load_run

    print(f"{task} β {beta:g}: validation statistics of the best checkpoint", flush=True)
    start = time.perf_counter()
    _, data, model = load_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stats: dict[str, Any] = {
        "n_val": len(data.val),
        "steps": metrics.get("steps"),
        "best_val_step": best_logged_step(run_dir),
        "mass_settings": mass_settings,
    }
    with warnings.catch_warnings():  # unconverged root solves: their rows are NaN and counted
        warnings.simplefilter("ignore", RuntimeWarning)
        for variant in ("decoder", "encoder"):
            with torch.no_grad():
                log_q = batched_log_prob(model, data.val, 1000, variant=variant)
            nll, stderr, unsolved = nll_summary(log_q)
            mass = model_density_mass(model, data.val, variant=variant, seed=0, **mass_settings)
            stats[variant] = {
                "nll": nll,
                "nll_stderr": stderr,
                "unsolved_rows": unsolved,
                "mass": mass.mass,
                "mass_stderr": mass.stderr,
                "mass_unsolved": mass.unsolved,
                "mass_evaluations": mass.n,
            }
    path.write_text(json.dumps(stats, indent=2))
    dec, enc = stats["decoder"], stats["encoder"]
    print(
        f"{task} β {beta:g}: val NLL decoder {dec['nll']:.3f} (mass {dec['mass']:.3f}, "
        f"{dec['unsolved_rows']} unsolved rows), encoder {enc['nll']:.3f} (mass {enc['mass']:.3f}) "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return stats


def _num(value: float | None, digits: int = 4) -> float | None:
    """A JSON number rounded to ``digits``; NaN and infinities become ``None``."""
    return round(float(value), digits) if value is not None and math.isfinite(value) else None


def rows_of(task: str, beta: float, k: int, stats: dict[str, Any], args: argparse.Namespace) -> list[dict]:
    """The two rows of one trained model: refined draws (K) and one decoder pass (0)."""
    run_dir = run_dir_of(task, beta, args)
    # a run trained without a C2ST records its time apart; its later C2ST only reloads it
    timing = run_dir / TRAIN_FILE
    timing = timing if timing.is_file() else run_dir / f"sbi_c2st_k{k}.json"
    train_seconds = json.loads(timing.read_text())["train_seconds"]
    rows = []
    for refine, density in ((k, "encoder"), (0, "decoder")):
        path = run_dir / f"sbi_c2st_k{refine}.json"
        # a setting trained without a C2ST (--c2st selected) has none
        c2st = json.loads(path.read_text()) if path.is_file() else None
        v = stats[density]
        rows.append(
            {
                "task": task,
                "budget": args.sizes.budget,
                "seed": args.seed,
                "beta": float(beta),
                "overrides": list(args.settings),
                "sample_refine_steps": refine,
                "density_of_draws": density,
                "steps": stats["steps"],
                "best_val_step": stats["best_val_step"],
                "n_val": stats["n_val"],
                "val_nll": _num(v["nll"]),
                "val_nll_stderr": _num(v["nll_stderr"]),
                "val_unsolved_rows": v["unsolved_rows"],
                "val_mass": _num(v["mass"]),
                "val_mass_stderr": _num(v["mass_stderr"]),
                "val_mass_unsolved": v["mass_unsolved"],
                "val_mass_evaluations": v["mass_evaluations"],
                "val_mass_conditions": stats["mass_settings"]["conditions"],
                "mean_c2st": None if c2st is None else c2st["mean_c2st"],
                "c2st_per_observation": None if c2st is None else [o["c2st"] for o in c2st["observations"]],
                "c2st_classifier": None if c2st is None else c2st["c2st_classifier"],
                "num_samples": None if c2st is None else c2st["num_samples"],
                "train_seconds": _num(train_seconds, 1),
            }
        )
    return rows


# -- the results file -----------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def _key(row: dict[str, Any]) -> tuple:
    """A row's identity: :data:`KEY` and its ``--set`` overrides (none in rows that predate them)."""
    return (*(row[k] for k in KEY), tuple(row.get("overrides", ())))


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with each row that has the :data:`KEY` of a new row replaced by it (in place); the
    other new rows are appended."""
    fresh = {_key(r): r for r in new}
    merged = [fresh.pop(_key(r), r) for r in old]
    return merged + list(fresh.values())


def trusted(row: dict[str, Any]) -> bool:
    """Whether a row's validation NLL is that of a normalised density: its mass is one within
    ``max(3 s.e., 0.05)``, and for the decoder its solve failed on at most 5 % of the rows."""
    mass, stderr, nll = row.get("val_mass"), row.get("val_mass_stderr"), row.get("val_nll")
    if mass is None or stderr is None or nll is None:
        return False
    if abs(mass - 1) > max(MASS_SIGMAS * stderr, MASS_TOLERANCE):
        return False
    return (
        row["density_of_draws"] != "decoder"
        or row["val_unsolved_rows"] <= MAX_UNSOLVED_FRACTION * row["n_val"]
    )


def select(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trusted row with the lowest validation NLL, or ``None`` if no row is trusted."""
    candidates = [r for r in rows if trusted(r)]
    return min(candidates, key=lambda r: r["val_nll"]) if candidates else None


def groups(rows: list[dict[str, Any]]) -> dict[tuple[str, int, int], list[dict[str, Any]]]:
    """Rows by (task, budget, seed), in the order of the file; each group by β and K, descending."""
    out: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["task"], r["budget"], r["seed"]), []).append(r)

    def order(r: dict[str, Any]) -> tuple:
        return (-r["beta"], r.get("overrides") or [], -r["sample_refine_steps"])

    return {g: sorted(rs, key=order) for g, rs in out.items()}


# -- the report -----------------------------------------------------------------------------------
def _signed(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}".replace("-", "−")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _draws(k: int) -> str:
    return "one decoder pass (0)" if k == 0 else f"refined ({k})"


def _overrides(overrides: Any) -> str:
    """``--set`` overrides, each after a comma."""
    return "".join(f", `{o}`" for o in overrides or ())


def _setting(beta: float, k: int, overrides: Any = ()) -> str:
    return f"β {beta:g}, {_draws(k)}{_overrides(overrides)}"


def _extra(row: dict[str, Any]) -> str:
    """A row's ``--set`` overrides, after its β."""
    return _overrides(row.get("overrides"))


def _c2st(row: dict[str, Any] | None) -> str:
    return "–" if row is None or row.get("mean_c2st") is None else f"{row['mean_c2st']:.3f}"


def task_section(task: str, budget: int, seed: int, rows: list[dict[str, Any]]) -> list[str]:
    preset_beta, preset_k = preset_settings(task)
    chosen = select(rows)
    preset_row = next((r for r in rows if is_preset(r)), None)
    conditions = sorted({r["val_mass_conditions"] for r in rows})
    mass_head = f"mass ({_count(conditions[0], 'val condition')})" if len(conditions) == 1 else "mass"
    lines = [
        f"## {task} (budget {budget:,}, seed {seed})",
        "",
        "| β | draws (`sample_refine_steps`) | density | val NLL ± s.e. | unsolved val rows | "
        f"{mass_head} | C2ST |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        notes = [_draws(r["sample_refine_steps"])]
        if r is preset_row:
            notes.append("preset")
        if r is chosen:
            notes.append("**validation-selected**")
        nll = "–"
        if r["val_nll"] is not None:
            stderr = r["val_nll_stderr"]
            nll = f"{_signed(r['val_nll'])} ± " + ("–" if stderr is None else f"{stderr:.3f}")
        if r["val_mass"] is None:
            mass = "–"
        else:
            mass = f"{r['val_mass']:.2f} ± {r['val_mass_stderr']:.2f}"
            if r["val_mass_unsolved"]:
                mass += " (lower bound)"
        if len(conditions) > 1:
            mass += f" ({_count(r['val_mass_conditions'], 'condition')})"
        lines.append(
            f"| {r['beta']:g}{_extra(r)} | {', '.join(notes)} | {r['density_of_draws']} | {nll} | "
            f"{r['val_unsolved_rows']} / {r['n_val']} | {mass} | {_c2st(r)} |"
        )
    models = {}
    for r in rows:
        if r["sample_refine_steps"] > 0:
            models[r["beta"], tuple(r.get("overrides", ()))] = r
    trained = "; ".join(
        f"β {r['beta']:g}{_extra(r)}: {r['steps']:,} steps with K = {r['sample_refine_steps']}, "
        f"best validation NLL at step {r['best_val_step']:,}"
        + ("" if r["train_seconds"] is None else f", {r['train_seconds']:.0f} s")
        for r in models.values()
        if r["steps"] is not None and r["best_val_step"] is not None
    )
    counts = {(len(r["c2st_per_observation"]), r["num_samples"]) for r in rows if r["mean_c2st"] is not None}
    c2st_note = ""
    if len(counts) == 1:
        (n_obs, n_draws) = counts.pop()
        c2st_note = f" C2ST: mean over {_count(n_obs, 'observation')}, {n_draws:,} draws each."
    lines += ["", f"Trained models: {trained}.{c2st_note}" if trained else c2st_note.strip(), ""]
    # the setting the presets had when β and refinement were tuned on the scored C2ST
    tuned_beta = C2ST_TUNED_BETA.get(task, preset_beta)
    tuned_row = next(
        (
            r
            for r in rows
            if (r["beta"], r["sample_refine_steps"]) == (tuned_beta, TRAIN_REFINE_STEPS)
            and not r.get("overrides")
        ),
        None,
    )
    tuned_text = f"{_setting(tuned_beta, TRAIN_REFINE_STEPS)}, C2ST {_c2st(tuned_row)}"
    preset_overrides = preset_row.get("overrides") if preset_row else None
    preset_text = f"{_setting(preset_beta, preset_k, preset_overrides)} (`sbi-{task}`)"
    if chosen is None:
        lines.append(
            f"Selected: none (no normalised setting: no row is trusted); preset now: {preset_text}; "
            f"C2ST-tuned setting: {tuned_text}."
        )
    else:
        change = "not available"
        if (
            tuned_row is not None
            and tuned_row.get("mean_c2st") is not None
            and chosen.get("mean_c2st") is not None
        ):
            gap = chosen["mean_c2st"] - tuned_row["mean_c2st"]
            change = f"{gap:+.3f} (selected − C2ST-tuned; lower is better)"
        lines.append(
            f"Selected: {_setting(chosen['beta'], chosen['sample_refine_steps'], chosen.get('overrides'))}, "
            f"val NLL {_signed(chosen['val_nll'])}, C2ST {_c2st(chosen)}; C2ST-tuned setting: {tuned_text}; "
            f"C2ST change {change}; preset now: {preset_text}."
        )
    return [*lines, ""]


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# SBI preset selection on validation NLL",
        "",
        "Each setting (β, draws) of a task's conditional free-form flow is scored by the validation NLL "
        "(nats, standardised θ; the validation split of the simulation budget, never sbibm's observations) "
        "of the density its draws follow: the decoder density for one decoder pass (K = 0), the encoder "
        "density for refined draws (K > 0). That NLL is trusted only where the density's mass on the first "
        f"validation conditions is one within max({MASS_SIGMAS:g} s.e., {MASS_TOLERANCE:g}) and, for the "
        f"decoder, its root solve failed on at most {MAX_UNSOLVED_FRACTION:.0%} of the validation rows; the "
        "trusted setting with the lowest NLL is selected. Each β is trained once with refinement (the "
        f"preset's K, else {TRAIN_REFINE_STEPS}; best checkpoint by the encoder validation NLL) and the "
        "K = 0 row samples the same checkpoint; C2ST (batched classifier, mean over observations; 0.5 is "
        "best) is reported, not used for the selection.",
        "",
        f"Command: {command}. Protocol: `docs/sbi-selection.md`; rows: `sbi_selection.jsonl`. "
        "A decoder mass with unsolved quadrature or importance points counts them as zero (lower bound).",
        "",
    ]
    for (task, budget, seed), group in groups(rows).items():
        lines += task_section(task, budget, seed, group)
    return "\n".join(lines)


def score_selected(task: str, k: int, args: argparse.Namespace, command: str) -> str | None:
    """``--c2st selected``: score the C2ST of the task's selected setting if the results file has
    none and its model is in ``--runs``; return the rewritten Markdown, or ``None``."""
    s = args.sizes
    rows = [
        r
        for r in read_rows(args.out / f"{NAME}.jsonl")
        if (r["task"], r["budget"], r["seed"]) == (task, s.budget, args.seed)
    ]
    chosen = select(rows)
    if chosen is None or chosen["mean_c2st"] is not None:
        return None
    beta, refine = chosen["beta"], chosen["sample_refine_steps"]
    if (
        tuple(chosen.get("overrides", ())) != args.settings
        or not (run_dir_of(task, beta, args) / VAL_FILE).is_file()
    ):
        print(f"{task}: the selected β {beta:g} has no run in {args.runs}; no C2ST scored", flush=True)
        return None
    score(task, beta, refine, args, train=False)
    stats = json.loads((run_dir_of(task, beta, args) / VAL_FILE).read_text())
    return write_results(args.out, rows_of(task, beta, k, stats, args), command)


def write_results(out: Path, new: list[dict[str, Any]], command: str) -> str:
    """Merge ``new`` into ``<out>/sbi_selection.jsonl`` and render the Markdown of the whole file."""
    path = out / f"{NAME}.jsonl"
    rows = merge_rows(read_rows(path), new)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = markdown(rows, command)
    (out / f"{NAME}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    line = "python benchmarks/sbi_selection.py " + " ".join(sys.argv[1:] if argv is None else argv)
    command = f"`{line.strip()}` (budget {args.sizes.budget:,}, seed {args.seed})"
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(read_rows(args.out / f"{NAME}.jsonl"), command)
    try:
        for task in args.tasks:
            k = train_refine_steps(task)
            for beta in args.betas or [preset_settings(task)[0]]:
                if args.reuse:
                    check_reusable(task, beta, k, args)
                if args.c2st == "every":
                    score(task, beta, k, args, train=True)
                    score(task, beta, 0, args, train=False)
                else:
                    train_only(task, beta, k, args)
                stats = validation_stats(task, beta, args)
                text = write_results(args.out, rows_of(task, beta, k, stats, args), command)
            if args.c2st == "selected":
                text = score_selected(task, k, args, command) or text
    except ValueError as err:  # e.g. --reuse of a run trained with another config
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
