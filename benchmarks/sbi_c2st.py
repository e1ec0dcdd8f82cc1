"""C2ST of posterior estimates on sbibm tasks: a conditional free-form flow against NPE (NSF).

Each (task, budget, method) is one run of :func:`freeflows.experiments.sbi.run_sbi`, the same code
as ``freeflows sbi``:

* ``fff``: the preset ``sbi-<task>`` trained by the runner on ``budget`` simulations (seed
  ``--seed``); draws are un-standardised before scoring;
* ``npe-nsf``: NPE with sbi's neural spline flow (:mod:`freeflows.eval.baselines`) on the same
  simulations.

For each reference observation, ``--num-samples`` draws inside the prior's support are compared
with the first ``--num-samples`` of sbibm's reference samples by C2ST (``--c2st sklearn`` is
sbibm's classifier, ``--c2st batched`` the same algorithm in torch for all observations at once,
``--c2st torch`` a faster, different one, not sbibm-comparable). 0.5 is best.

``--reuse`` re-scores fff models that an earlier run of this script trained in ``--runs``, when
only sampling options (``model.fff.sample_refine_steps``) changed; their rows keep the original
training time and say ``"reused_training": true``.

Each finished run is appended to ``benchmarks/results/<name>.jsonl`` at once (so a long job that is
stopped keeps what it measured), and ``<name>.md`` is rewritten from all rows of that file.

    python benchmarks/sbi_c2st.py --tasks two_moons --budgets 1000 10000 --methods fff npe-nsf
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from freeflows.data.sbi import NUM_OBSERVATIONS, TASKS, reference_posterior
from freeflows.eval.c2st import C2ST_CLASSIFIERS
from freeflows.experiments.sbi import run_sbi

RESULTS = Path(__file__).parent / "results"


def refine_steps(row: dict) -> int:
    """The ``sample_refine_steps`` an fff row sampled with (0 for rows from before the option)."""
    return int((row.get("model") or {}).get("fff", {}).get("sample_refine_steps", 0))


def training_key(row: dict) -> str | None:
    """What decides an fff row's trained model: its options (apart from sampling ones), optimiser,
    trainer settings and the number of steps it ran (so ``max_epochs``/``max_steps`` that resolve
    to the same length count as equal). ``None`` for rows that did not record them."""
    if not all(k in row for k in ("model", "optim", "trainer", "steps")):
        return None
    fff = {k: v for k, v in row["model"].get("fff", {}).items() if k != "sample_refine_steps"}
    trainer = {k: v for k, v in row["trainer"].items() if k not in ("max_steps", "max_epochs")}
    return json.dumps([fff, row["optim"], trainer, row["steps"]], sort_keys=True)


def _latest(rows: list[dict]) -> dict[tuple[str, int], dict[str, dict]]:
    """(task, budget) -> method -> its last row (a rerun replaces an earlier row). When the last fff
    row sampled with refinement, the last one-decoder-pass fff row *of the same trained model*
    (same :func:`training_key`) is kept too, as ``"fff-1pass"``."""
    cells: dict[tuple[str, int], dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["budget"]), {})[r["method"]] = r
    for key, got in cells.items():
        last = got.get("fff")
        if last is None or refine_steps(last) == 0 or training_key(last) is None:
            continue
        for r in rows:
            same_cell = (r["task"], r["budget"]) == key and r["method"] == "fff"
            if same_cell and refine_steps(r) == 0 and training_key(r) == training_key(last):
                got["fff-1pass"] = r
    return cells


def _score(got: dict[str, dict], method: str) -> str:
    """A method's mean C2ST in a cell, in bold if it is the better of fff and npe-nsf."""
    if method not in got:
        return "–"
    value = got[method]["mean_c2st"]
    rivals = [got[m]["mean_c2st"] for m in ("fff", "npe-nsf") if m in got]
    bold = method in ("fff", "npe-nsf") and len(rivals) > 1 and value == min(rivals)
    return f"**{value:.3f}**" if bold else f"{value:.3f}"


def side_by_side(rows: list[dict]) -> list[str]:
    """The README table: one line per (task, budget), fff against npe-nsf (the better in bold),
    the same trained fff model's one-decoder-pass score if its latest row is refined, fff's step
    count, both training times and the share of fff's draws inside the prior."""
    cells = _latest(rows)
    lines = [
        "| task | θ dim | budget | fff | npe-nsf | fff, one decoder pass | fff steps | fff train s | "
        "npe train s | fff prior acceptance (min–max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, budget in sorted(cells, key=lambda k: (TASKS.index(k[0]), k[1])):
        got = cells[(task, budget)]
        fff, npe = got.get("fff", {}), got.get("npe-nsf", {})
        dim = len(torch.as_tensor(reference_posterior(task, 1)[0]))
        accept = [o["prior_acceptance"] for o in fff.get("observations", [])]
        lines.append(
            f"| {task} | {dim} | {budget} | {_score(got, 'fff')} | {_score(got, 'npe-nsf')} | "
            f"{_score(got, 'fff-1pass')} | {fff.get('steps', '–')} | "
            f"{fff.get('train_seconds', '–')} | {npe.get('train_seconds', '–')} | "
            + (f"{min(accept):.2f}–{max(accept):.2f} |" if accept else "– |")
        )
    return lines


def markdown(rows: list[dict]) -> str:
    """The table: mean C2ST over the observations of each (task, budget, method), with settings."""
    lines = [
        "# C2ST on sbibm tasks (0.5 is best, 1.0 is useless)",
        "",
        "| task | budget | method | refine steps | mean C2ST | observations | draws/obs | classifier | seed "
        "| train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (TASKS.index(r["task"]), r["budget"], r["method"])):
        obs = [o["observation"] for o in r["observations"]]
        span = f"{obs[0]}–{obs[-1]}" if obs == list(range(obs[0], obs[-1] + 1)) and len(obs) > 1 else obs
        lines.append(
            f"| {r['task']} | {r['budget']} | {r['method']} | "
            f"{refine_steps(r) if r['method'] == 'fff' else '–'} | {r['mean_c2st']:.3f} | {span} | "
            f"{r['num_samples']} | {r['c2st_classifier']} | {r['seed']} | {r['train_seconds']} |"
        )
    lines += ["", "Side by side (mean C2ST, the latest row of each; lower is better):", ""]
    lines += side_by_side(rows)
    lines += ["", "Per observation:", ""]
    for r in sorted(rows, key=lambda r: (TASKS.index(r["task"]), r["budget"], r["method"])):
        per = ", ".join(f"{o['observation']}: {o['c2st']:.3f}" for o in r["observations"])
        lines.append(f"- {r['task']} {r['budget']} {r['method']}: {per}")
    return "\n".join(lines) + "\n"


def rewrite_table(name: str) -> None:
    """Rewrite ``<name>.md`` from all rows of ``<name>.jsonl``, and print it."""
    rows = [json.loads(line) for line in (RESULTS / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    table = markdown(rows)
    (RESULTS / f"{name}.md").write_text(table)
    print(table, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons"], choices=TASKS)
    parser.add_argument("--budgets", nargs="+", type=int, default=[1000, 10000])
    parser.add_argument("--methods", nargs="+", default=["fff", "npe-nsf"], choices=["fff", "npe-nsf"])
    parser.add_argument("--observations", nargs="+", type=int, default=list(range(1, NUM_OBSERVATIONS + 1)))
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--c2st", choices=C2ST_CLASSIFIERS, default="sklearn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="fff preset override")
    parser.add_argument("--runs", default="runs/bench-sbi", help="parent folder of the run directories")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="sbi_c2st")
    parser.add_argument("--report", action="store_true", help="only rewrite <name>.md from <name>.jsonl")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="fff: sample a model already trained in the run directory with the same config (apart "
        "from sampling options) instead of training it again",
    )
    args = parser.parse_args()
    if args.report:
        rewrite_table(args.name)
        return
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    jsonl = RESULTS / f"{args.name}.jsonl"
    for task in args.tasks:
        for budget in args.budgets:
            for method in args.methods:
                result = run_sbi(
                    task,
                    budget,
                    method=method,
                    observations=args.observations,
                    num_samples=args.num_samples,
                    seed=args.seed,
                    out=Path(args.runs) / f"{task}-{budget}-{method}-seed{args.seed}",
                    overrides=list(args.overrides) if method == "fff" else None,
                    c2st_classifier=args.c2st,
                    plots="first",
                    reuse=args.reuse and method == "fff",
                )
                result["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
                with jsonl.open("a") as fh:
                    fh.write(json.dumps(result) + "\n")
                rewrite_table(args.name)


if __name__ == "__main__":
    main()
