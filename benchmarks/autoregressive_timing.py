"""Sampling time and density time of MAF, IAF, RealNVP and the free-form flow, side by side.

An autoregressive layer is one network pass in one direction and ``D`` sequential passes in the
other (see :mod:`freeflows.transforms.autoregressive`):

* MAF: density one pass per layer, sampling ``D`` passes per layer;
* IAF: sampling one pass per layer, density ``D`` passes per layer;
* RealNVP (affine couplings): one pass per layer both ways;
* free-form flow: sampling is one decoder pass; the exact density needs the decoder's full
  ``D × D`` Jacobian (``D`` forward-mode products, batched with ``torch.func``).

All models are untrained, with their default sizes (the ``model.<kind>`` defaults of the tool), in
one process with one torch thread. Each time is the median of ``--repeats`` calls after one
warm-up call: ``sample(n)`` and ``log_prob(x)`` of ``n`` points (``--batch``), without gradients
for the exact flows. The reported time is the **CPU time of the calling thread**
(``time.thread_time``): on a shared, overloaded machine, wall time mostly measures how often the
process is preempted, which inflates long calls more than short ones and distorts the ratios.
Median wall times are in the JSON too. The free-form flow's ``log_prob`` runs with autograd on,
as in the tool's evaluation; it builds its Jacobians with ``torch.func``.

Writes ``<out>/autoregressive_timing.json`` and ``.md``.

    python benchmarks/autoregressive_timing.py --dims 2 16 64 --batch 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from freeflows.flows import IAF, MAF, RealNVP
from freeflows.freeform import FreeFormFlow

ROOT = Path(__file__).resolve().parent
NAME = "autoregressive_timing"
MODELS: dict[str, Callable[[int], nn.Module]] = {
    "maf": lambda d: MAF(d),
    "iaf": lambda d: IAF(d),
    "realnvp": lambda d: RealNVP(d),
    "fff": lambda d: FreeFormFlow.resnet(d),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    p.add_argument("--batch", type=int, default=1000, help="points per sample/log_prob call")
    p.add_argument("--repeats", type=int, default=11, help="timed calls per measurement (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    return p.parse_args(argv)


def timings(fn: Callable[[], Any], repeats: int) -> tuple[list[float], list[float]]:
    """CPU seconds of this thread and wall seconds of ``repeats`` calls, after one warm-up call."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - w)
    return cpu, wall


def time_model(kind: str, d: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = MODELS[kind](d).eval()
    x = torch.randn(args.batch, d, generator=torch.Generator().manual_seed(args.seed))

    def sample() -> None:
        with torch.no_grad():
            model.sample(args.batch)

    def density() -> None:
        if kind == "fff":
            model.log_prob(x)
        else:
            with torch.no_grad():
                model.log_prob(x)

    if not torch.isfinite(model.log_prob(x)).all():
        raise RuntimeError(f"{kind} at D={d}: non-finite log_prob")
    (cpu_sample, wall_sample), (cpu_density, wall_density) = (
        timings(sample, args.repeats),
        timings(density, args.repeats),
    )
    return {
        "kind": kind,
        "dim": d,
        "n_params": sum(p.numel() for p in model.parameters()),
        "sample_seconds": statistics.median(cpu_sample),
        "density_seconds": statistics.median(cpu_density),
        "sample_wall_seconds": statistics.median(wall_sample),
        "density_wall_seconds": statistics.median(wall_density),
        "sample_wall_seconds_min": min(wall_sample),
        "density_wall_seconds_min": min(wall_density),
    }


def ratios(rows: list[dict[str, Any]], d: int) -> dict[str, float]:
    t = {r["kind"]: r for r in rows if r["dim"] == d}
    out: dict[str, float] = {}
    if "maf" in t:
        out["maf_sample_over_maf_density"] = t["maf"]["sample_seconds"] / t["maf"]["density_seconds"]
    if "iaf" in t:
        out["iaf_density_over_iaf_sample"] = t["iaf"]["density_seconds"] / t["iaf"]["sample_seconds"]
    if "realnvp" in t:
        nvp = t["realnvp"]
        if "maf" in t:
            out["maf_sample_over_realnvp_sample"] = t["maf"]["sample_seconds"] / nvp["sample_seconds"]
        if "iaf" in t:
            out["iaf_density_over_realnvp_density"] = t["iaf"]["density_seconds"] / nvp["density_seconds"]
        if "fff" in t:
            out["fff_density_over_realnvp_density"] = t["fff"]["density_seconds"] / nvp["density_seconds"]
            out["fff_sample_over_realnvp_sample"] = t["fff"]["sample_seconds"] / nvp["sample_seconds"]
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Sampling vs density time: MAF, IAF, RealNVP, free-form flow",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Untrained models with default sizes; {s['batch']} points per call; median of {s['repeats']} "
        f"calls after a warm-up; {s['threads']} torch thread(s); {s['machine']}. Times are CPU time of "
        "the calling thread (`time.thread_time`), since wall time on this shared, overloaded machine "
        "mostly measures preemption; median wall times in parentheses.",
        "",
        "| D | model | params | sample ms | density ms |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['dim']} | {r['kind']} | {r['n_params']:,} | {1e3 * r['sample_seconds']:.2f} "
            f"({1e3 * r['sample_wall_seconds']:.1f}) | {1e3 * r['density_seconds']:.2f} "
            f"({1e3 * r['density_wall_seconds']:.1f}) |"
        )
    lines += [
        "",
        "Ratios of CPU times (the O(D)-sequential direction of each autoregressive flow):",
        "",
        "| D | MAF sample / MAF density | IAF density / IAF sample | MAF sample / RealNVP sample "
        "| IAF density / RealNVP density | FFF density / RealNVP density |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for d, q in result["ratios"].items():
        cells = [
            q.get(k, float("nan"))
            for k in (
                "maf_sample_over_maf_density",
                "iaf_density_over_iaf_sample",
                "maf_sample_over_realnvp_sample",
                "iaf_density_over_realnvp_density",
                "fff_density_over_realnvp_density",
            )
        ]
        lines.append(f"| {d} | " + " | ".join(f"{c:.1f}×" for c in cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for d in args.dims:
        for kind in MODELS:
            rows.append(time_model(kind, d, args))
            r = rows[-1]
            print(
                f"D={d:3d} {kind:8s} sample {1e3 * r['sample_seconds']:8.2f} ms CPU  "
                f"density {1e3 * r['density_seconds']:8.2f} ms CPU",
                flush=True,
            )
    result = {
        "settings": {
            "command": "python benchmarks/autoregressive_timing.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "dims": args.dims,
            "batch": args.batch,
            "repeats": args.repeats,
            "threads": args.threads,
            "seed": args.seed,
            "machine": f"{platform.machine()}, torch {torch.__version__}",
        },
        "rows": rows,
        "ratios": {str(d): ratios(rows, d) for d in args.dims},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / f"{NAME}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
