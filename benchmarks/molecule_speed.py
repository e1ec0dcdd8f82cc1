"""Generation speed of two trained molecule runs (the free-form flow and the E-NF baseline), side
by side: the same batches of atom counts drawn from the training histogram, one thread, CPU time
(``time.process_time``) of ``sample`` alone, the two models interleaved batch by batch so that
machine load hits both alike. Stability of each model's draws (EDM's bond rules) gives stable
molecules per second.

Usage::

    python benchmarks/molecule_speed.py RUN_FFF RUN_ENF [--batches 5] [--batch 100] \
        [--enf-solver dopri5 --enf-tol 1e-5]

``--enf-solver`` samples the E-NF with another ODE solver than it was trained with (an adaptive
one, as E-NF uses, with ``--enf-tol`` as rtol and atol); the results then go to
``molecule_speed_<solver>.json``.

Writes ``benchmarks/results/molecule_speed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from freeflows.eval.molecule_generation import draw_counts
from freeflows.eval.molecules import molecule_stability
from freeflows.runner.train import load_run

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs=2, help="run directories: free-form flow, then E-NF")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enf-solver", default=None)
    parser.add_argument("--enf-tol", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {}
    for name, run in zip(("free-form flow", "E-NF"), args.runs, strict=True):
        _, data, model = load_run(Path(run))
        models[name] = (data, model)
    enf = models["E-NF"][1]
    if args.enf_solver:
        enf.solver, enf.step_size = args.enf_solver, None
        enf.rtol = enf.atol = args.enf_tol
    gen = torch.Generator().manual_seed(args.seed)
    data0 = next(iter(models.values()))[0]
    seconds = dict.fromkeys(models, 0.0)
    stable = dict.fromkeys(models, 0)
    for _ in range(args.batches):
        counts = draw_counts(data0.meta["count_histogram"], args.batch, gen)
        c = counts.float().unsqueeze(1)
        for name, (data, model) in models.items():
            start = time.process_time()
            with torch.no_grad():
                x = model.sample(1, c)[0]
            seconds[name] += time.process_time() - start
            mask = torch.arange(x.shape[1]) < counts.unsqueeze(1)
            types = data.meta["encoding"].decode(x[..., 3:], mask)
            stable[name] += round(molecule_stability(x[..., :3], types, mask) * args.batch)
    n = args.batches * args.batch
    rows = {
        name: {
            "molecules": n,
            "cpu_seconds": seconds[name],
            "molecules_per_second": n / seconds[name],
            "molecule_stability": stable[name] / n,
            "stable_molecules_per_second": stable[name] / seconds[name],
        }
        for name in models
    }
    fff, enf_row = rows["free-form flow"], rows["E-NF"]
    solver = f"{enf.solver}" + ("" if enf.step_size is None else f" step {enf.step_size}")
    if enf.step_size is None:
        solver += f" rtol=atol={enf.rtol:g}"
    out = {
        "runs": args.runs, "batch": args.batch, "batches": args.batches, "seed": args.seed, "threads": 1,
        "enf_solver": solver, "models": rows,
        "speed_ratio": fff["molecules_per_second"] / enf_row["molecules_per_second"],
    }
    RESULTS.mkdir(exist_ok=True)
    stem = "molecule_speed" + (f"_{args.enf_solver}" if args.enf_solver else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2))
    lines = [
        f"Generation at batch {args.batch}, {args.batches} interleaved batches, one thread, CPU time "
        f"(seed {args.seed}); E-NF solver {solver}.",
        "",
        "| model | molecules/s | molecule stability | stable molecules/s |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['molecules_per_second']:.1f} | {r['molecule_stability']:.3f} | "
            f"{r['stable_molecules_per_second']:.2f} |"
        )
    lines += ["", f"Speed ratio (molecules/s, free-form / E-NF): {out['speed_ratio']:.1f}"]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
