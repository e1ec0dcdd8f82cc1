"""Sampling throughput of every model, untrained, at D = 2 and 16, and of the free-form flow with
20 refinement steps (:mod:`freeflows.inversion`; random weights, so that all 20 steps run).

Each model is built with its default options by the same builder the CLI uses
(:func:`freeflows.experiments.registry.build_model`) and timed drawing ``N`` samples per call under
``torch.no_grad()``, single thread, medians over interleaved repeats (CPU time). Rows from
``sampling_speed.json`` (the CNF benchmark) and ``autoregressive_timing.json`` (classic flows),
if present in the results directory, are appended with their source.

    freeflows bench sampling [--quick]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import common

NAME = "sampling"
#: Rows: model kinds with their default options, plus named variants ``row -> (kind, options)``.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fff, 20 refine steps": ("fff", {"sample_refine_steps": 20}),
}
MODELS = ("fff", *VARIANTS, "realnvp", "maf", "iaf", "glow", "nice", "planar", "cnf")
DIMS = (2, 16)
N = 4096
OTHER_FILES = ("sampling_speed.json", "autoregressive_timing.json")


def sampler(kind: str, dim: int, n: int) -> Callable[[], Any]:
    from ..experiments.registry import build_model

    base, options = VARIANTS.get(kind, (kind, {}))
    torch.manual_seed(0)
    model = build_model({"kind": base, base: options}, (dim,), None).eval()
    if options.get("sample_refine_steps"):
        # An untrained ResNet is exactly the identity, so f(g(z)) = z and the refinement would stop
        # at once. Random weights (the timing of a pass does not depend on their values) make it
        # run all its steps, as it does on a trained model whose decoder inverts only roughly.
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.3 / max(1, param.shape[-1]) ** 0.5)

    def draw() -> None:
        with torch.no_grad():
            model.sample(n)

    return draw


def collected(out_dir: Path) -> list[dict[str, Any]]:
    """Sampling rows of the other benchmarks' result files, as ``{model, D, samples_per_s,
    source, note}``; files that are absent or in an unknown format are skipped."""
    rows: list[dict[str, Any]] = []
    path = out_dir / "sampling_speed.json"
    if path.exists():
        data = json.loads(path.read_text())
        for name, m in (data.get("models") or {}).items():
            if isinstance(m, dict) and "samples_per_second" in m:
                note = f"trained on two moons, batch {data.get('batch')}"
                if m.get("model_options", {}).get("solver"):
                    note += f", {m['model_options']['solver']}"
                rows.append(
                    {
                        "model": name,
                        "D": 2,
                        "samples_per_s": m["samples_per_second"],
                        "source": path.name,
                        "note": note,
                    }
                )
    path = out_dir / "autoregressive_timing.json"
    if path.exists():
        data = json.loads(path.read_text())
        batch = (data.get("settings") or {}).get("batch")
        for r in data.get("rows", []):
            if batch and r.get("sample_seconds"):
                rows.append(
                    {
                        "model": r["kind"],
                        "D": r["dim"],
                        "samples_per_s": batch / r["sample_seconds"],
                        "source": path.name,
                        "note": f"untrained, batch {batch}, thread CPU time",
                    }
                )
    return rows


def run(out_dir: str = str(common.DEFAULT_OUT), quick: bool = False) -> dict[str, Any]:
    common.setup()
    env_start = common.environment()
    n = 512 if quick else N
    rows = []
    for dim in DIMS:
        fns, errors = {}, {}
        for kind in MODELS:
            try:
                fn = sampler(kind, dim, n)
                fn()
                fns[kind] = fn
            except Exception as err:  # noqa: BLE001 - recorded in the table
                errors[kind] = f"{type(err).__name__}: {err}"[:200]
        t = common.interleaved(fns, 3 if quick else 10, warmup=1)
        for kind in MODELS:
            row = {"model": kind, "D": dim, "n": n, "loadavg": [round(x, 2) for x in os.getloadavg()]}
            if kind in t:
                row["samples_per_s"] = n / common.median(t[kind])
            else:
                row["error"] = errors[kind]
            rows.append(row)
            print(row, flush=True)
    payload = {
        "benchmark": NAME,
        "quick": quick,
        "clock": common.CLOCK,
        "environment_start": env_start,
        "environment_end": common.environment(),
        "rows": rows,
        "collected": collected(Path(out_dir)),
    }
    payload["markdown"] = markdown(payload)
    return common.write(out_dir, NAME, payload, payload["markdown"])


def markdown(p: dict[str, Any]) -> str:
    by = {(r["model"], r["D"]): r for r in p["rows"]}

    def cell(kind: str, dim: int) -> str:
        r = by.get((kind, dim))
        if r is None:
            return "–"
        return common.fmt(r["samples_per_s"]) if "samples_per_s" in r else "error: " + r["error"][:60]

    rows = [[kind] + [cell(kind, d) for d in DIMS] for kind in MODELS]
    e0, e1 = p["environment_start"], p["environment_end"]
    text = (
        "### Sampling throughput (untrained, default options)\n\n"
        f"Samples per second drawing {p['rows'][0]['n']} at a time, `torch.no_grad()`, "
        f"`torch.set_num_threads(1)`, CPU time, load average {e0['loadavg'][0]} at start, "
        f"{e1['loadavg'][0]} at end.\n\n"
        + common.table(["model"] + [f"D = {d} [samples/s]" for d in DIMS], rows)
    )
    if p["collected"]:
        text += "\n\nCollected from the other benchmarks' result files:\n\n" + common.table(
            ["model", "D", "samples/s", "source", "note"],
            [
                [r["model"], r["D"], common.fmt(r["samples_per_s"]), r["source"], r["note"]]
                for r in sorted(p["collected"], key=lambda r: (r["D"], r["model"]))
            ],
        )
    return text


if __name__ == "__main__":
    common.main(run, __doc__)
