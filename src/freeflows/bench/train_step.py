"""Training-step cost vs dimension: free-form vs exact maximum likelihood vs autoencoder.

Same residual encoder/decoder for every variant (``ResNet(D, max(64, D), depth=2, blocks=2)``),
batch 256, one Adam step each, single thread. Times are medians over repeats in which the variants
run interleaved (shuffled order per repeat); ratios are medians of per-repeat ratios. Peak memory
is the peak of live torch CPU allocations during one step above those live at its start, from
torch.profiler's memory timeline.

    freeflows bench train_step [--quick]
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import common
from .nets import BATCH, exact_batch, hidden, train_step

NAME = "train_step"
VARIANTS = ("fff", "fff_jvp", "exact", "exact_structured", "ae")
EXACT = ("exact", "exact_structured")
DIMS = (2, 8, 32, 128, 512)
REPEATS = {2: 40, 8: 40, 32: 25, 128: 12, 512: 5}


def peak_memory(variant: str, dim: int, batch: int) -> float:
    """Peak of the live torch CPU allocations during one step, above those live when it starts
    (MiB), from torch.profiler's memory timeline (``profile_memory=True``)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    step = train_step(variant, dim, batch)
    step()  # Adam's state exists from here on, as in training
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    totals = [sum(s) for s in sizes]
    return (max(totals) - totals[0]) / 2**20


def op_counts(dim: int, steps: int = 3) -> dict[str, Any]:
    """Operator calls per step (exact, from torch.profiler) and the top self-CPU operators."""
    return {v: common.op_profile(train_step(v, dim), steps) for v in ("fff", "fff_jvp", "ae")}


def run(out_dir: str = str(common.DEFAULT_OUT), quick: bool = False) -> dict[str, Any]:
    """Time one training step of every variant at every D, measure its peak memory, profile the
    operators, and write the result files.

    Args:
        out_dir: results directory; ``train_step.json`` and ``.md`` are written there.
        quick: D = 2 and 32 only, 4 repeats, the profile at D = 2 only (a smoke run).

    Returns:
        The JSON payload, with its Markdown table under ``"markdown"``.
    """
    common.setup()
    env_start = common.environment()
    dims = (2, 32) if quick else DIMS
    rows = []
    for dim in dims:
        repeats = 4 if quick else REPEATS[dim]
        eb = exact_batch(dim)
        steps = {v: train_step(v, dim, eb if v in EXACT else BATCH) for v in VARIANTS}
        times = common.interleaved(steps, repeats, warmup=1)
        scale = {v: (BATCH / eb if v in EXACT else 1.0) for v in VARIANTS}
        t = {v: [s * scale[v] for s in times[v]] for v in VARIANTS}
        row: dict[str, Any] = {
            "D": dim,
            "hidden": hidden(dim),
            "repeats": repeats,
            "exact_batch": eb,
            "ms": {v: 1e3 * common.median(t[v]) for v in VARIANTS},
            "spread": {v: common.spread(t[v]) for v in VARIANTS},
            "exact_over_fff": common.paired_ratio(t["exact"], t["fff"]),
            "exact_structured_over_fff": common.paired_ratio(t["exact_structured"], t["fff"]),
            "fff_over_ae": common.paired_ratio(t["fff"], t["ae"]),
            "fff_jvp_over_ae": common.paired_ratio(t["fff_jvp"], t["ae"]),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        }
        row["peak_step_memory_mib"] = {v: peak_memory(v, dim, eb if v in EXACT else BATCH) for v in VARIANTS}
        rows.append(row)
        print(json.dumps(row), flush=True)
    profile = {str(d): op_counts(d) for d in ((2,) if quick else (2, 128))}
    payload = {
        "benchmark": NAME,
        "quick": quick,
        "batch": BATCH,
        "networks": "encoder and decoder ResNet(D, hidden=max(64, D), depth=2, blocks=2), SiLU",
        "optimizer": "torch.optim.Adam defaults, lr 1e-4; the step includes zero_grad, loss, backward, step",
        "exact": "full Jacobian + slogdet: 'exact' by vmap(jacrev) (torch.func), 'exact_structured' by "
        "freeflows.tangents; above D = 128 both run on exact_batch samples and their time is scaled "
        "to the batch (their memory is not)",
        "clock": common.CLOCK,
        "memory": "peak of live torch CPU allocations during one step above those live at its start "
        "(torch.profiler memory timeline, profile_memory=True); MiB",
        "environment_start": env_start,
        "environment_end": common.environment(),
        "rows": rows,
        "op_profile": profile,
    }
    payload["markdown"] = markdown(payload)
    return common.write(out_dir, NAME, payload, payload["markdown"])


def markdown(p: dict[str, Any]) -> str:
    """The Markdown report: times, ratios and peak memory of the variants per D.

    Args:
        p: the payload of :func:`run`.
    """
    f = common.fmt
    head = [
        "D",
        "hidden",
        "(a) fff [ms]",
        "(a') fff jvp [ms]",
        "(b) exact [ms]",
        "(b*) exact structured [ms]",
        "(c) AE [ms]",
        "(b)/(a)",
        "(b*)/(a)",
        "(a)/(c)",
        "(a')/(c)",
        "peak step memory a / a' / b / b* / c [MiB]",
    ]
    rows = []
    for r in p["rows"]:
        ms, mem = r["ms"], r["peak_step_memory_mib"]
        scaled = "" if r["exact_batch"] == p["batch"] else f" (batch {r['exact_batch']}, scaled)"
        rows.append(
            [
                r["D"],
                r["hidden"],
                f(ms["fff"]),
                f(ms["fff_jvp"]),
                f(ms["exact"]) + scaled,
                f(ms["exact_structured"]) + scaled,
                f(ms["ae"]),
                f(r["exact_over_fff"]),
                f(r["exact_structured_over_fff"]),
                f(r["fff_over_ae"]),
                f(r["fff_jvp_over_ae"]),
                " / ".join(f(mem[v]) for v in VARIANTS),
            ]
        )
    e0, e1 = p["environment_start"], p["environment_end"]
    note = (
        f"Batch {p['batch']}, torch {e0['torch']}, `torch.set_num_threads(1)`, {e0['cpu_count']} CPUs, "
        f"CPU time of the process, load average {e0['loadavg'][0]} at start, {e1['loadavg'][0]} at end "
        "(shared machine). (a) `FreeFormFlow.loss` with the default `vjp` surrogate, (a') with `jvp`, "
        "(b) exact ML with the full Jacobian by `vmap(jacrev)` (faster than `jacfwd` here), (b*) the "
        "same with the structured Jacobian of `freeflows.tangents`, (c) reconstruction only; each is "
        "one Adam step (zero_grad, loss, backward, step). Networks: encoder and decoder "
        "`ResNet(D, hidden, depth=2, blocks=2)`, hidden = max(64, D). Medians over repeats, variants "
        "interleaved; ratios are medians of per-repeat ratios. Memory: peak of live torch CPU "
        "allocations during one step (torch.profiler memory timeline); for (b)/(b*) at the batch "
        "they ran on."
    )
    return f"### Training step cost vs D\n\n{note}\n\n" + common.table(head, rows)


if __name__ == "__main__":
    common.main(run, __doc__)
