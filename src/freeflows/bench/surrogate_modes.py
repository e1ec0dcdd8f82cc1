"""The two ways of computing the free-form surrogate, and torch.compile on CPU.

``FreeFormFlow(surrogate="vjp")``: :math:`\\mathrm{sg}(v^\\top J_g)\\,J_f v`, with :math:`J_f v` a
forward-mode tangent of the encoder's own forward pass and :math:`v^\\top J_g` one reverse product
through the decoder; the loss needs a first-order backward pass only.
``FreeFormFlow(surrogate="jvp")``: :math:`v^\\top J_f\\,\\mathrm{sg}(J_g v)`, with :math:`J_g v` forward
mode through the decoder and :math:`v^\\top J_f` reverse mode with ``create_graph`` through the
encoder, so the backward pass is a double backward.

Both are timed as loss + backward (no optimiser), interleaved, single thread, for every D, and
relative to the autoencoder floor (reconstruction only). Then ``torch.compile`` (inductor) of the
loss is tried in both modes at one D and either timed or its error recorded.

    freeflows bench surrogate_modes [--quick]
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

import torch

from . import common
from .nets import BATCH, flow, hidden, loss_fn

NAME = "surrogate_modes"
DIMS = (2, 8, 32, 128, 512)
REPEATS = {2: 40, 8: 40, 32: 30, 128: 15, 512: 6}
COMPILE_DIM = 32


def grad_step(variant: str, dim: int, compile_loss: bool = False) -> Callable[[], None]:
    """Loss and backward of one variant (fresh networks, same seed), gradients reset each call."""
    model = flow(dim)
    x = torch.randn(BATCH, dim, generator=torch.Generator().manual_seed(1))
    loss = loss_fn(variant, model, x)
    if compile_loss:
        loss = torch.compile(loss)

    def step() -> None:
        for p in model.parameters():
            p.grad = None
        loss().backward()

    return step


def try_compile(dim: int, repeats: int) -> dict[str, Any]:
    """``torch.compile`` (inductor) the loss of ``fff_vjp``, ``fff_jvp`` and ``ae`` and time each against
    its eager step; a variant that fails to compile records its error instead.

    Args:
        dim: the data dimension D.
        repeats: interleaved repeats of the timing.

    Returns:
        ``{"D", "backend", "<variant>+compile": "ok" or "error: ...", "ms": {step: median ms}}``.
    """
    out: dict[str, Any] = {"D": dim, "backend": "inductor"}
    fns: dict[str, Callable[[], None]] = {}
    for variant in ("fff_vjp", "fff_jvp", "ae"):
        fns[variant] = grad_step(variant, dim)
        try:
            step = grad_step(variant, dim, compile_loss=True)
            step()
            step()
            fns[variant + "+compile"] = step
            out[variant + "+compile"] = "ok"
        except Exception as err:  # noqa: BLE001 - the error is the result
            msg = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()
            out[variant + "+compile"] = "error: " + (msg[-1] if msg else type(err).__name__)[:300]
        torch._dynamo.reset()
    times = common.interleaved(fns, repeats, warmup=1)
    out["ms"] = {k: 1e3 * common.median(v) for k, v in times.items()}
    return out


def run(out_dir: str = str(common.DEFAULT_OUT), quick: bool = False) -> dict[str, Any]:
    """Time loss + backward of the ``vjp`` and ``jvp`` surrogates and the autoencoder floor at every D,
    try ``torch.compile`` at D = :data:`COMPILE_DIM`, and write the result files.

    Args:
        out_dir: results directory; ``surrogate_modes.json`` and ``.md`` are written there.
        quick: D = 2 and 32 only, 4 repeats (3 for the compiled timing; a smoke run).

    Returns:
        The JSON payload, with its Markdown tables under ``"markdown"``.
    """
    common.setup()
    env_start = common.environment()
    rows = []
    for dim in (2, 32) if quick else DIMS:
        repeats = 4 if quick else REPEATS[dim]
        fns = {v: grad_step(v, dim) for v in ("fff_vjp", "fff_jvp", "ae")}
        t = common.interleaved(fns, repeats, warmup=1)
        rows.append(
            {
                "D": dim,
                "hidden": hidden(dim),
                "repeats": repeats,
                "ms": {k: 1e3 * common.median(v) for k, v in t.items()},
                "jvp_over_vjp": common.paired_ratio(t["fff_jvp"], t["fff_vjp"]),
                "vjp_over_ae": common.paired_ratio(t["fff_vjp"], t["ae"]),
                "jvp_over_ae": common.paired_ratio(t["fff_jvp"], t["ae"]),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
            }
        )
        print(rows[-1], flush=True)
    compiled = try_compile(COMPILE_DIM, 3 if quick else 15)
    payload = {
        "benchmark": NAME,
        "quick": quick,
        "batch": BATCH,
        "measures": "loss + backward, no optimiser step; medians over interleaved repeats",
        "environment_start": env_start,
        "environment_end": common.environment(),
        "rows": rows,
        "compile": compiled,
    }
    payload["markdown"] = markdown(payload)
    return common.write(out_dir, NAME, payload, payload["markdown"])


def markdown(p: dict[str, Any]) -> str:
    """The Markdown report: times and ratios per D, then the ``torch.compile`` table.

    Args:
        p: the payload of :func:`run`.
    """
    f = common.fmt
    head = ["D", "hidden", "vjp [ms]", "jvp [ms]", "AE [ms]", "jvp/vjp", "vjp/AE", "jvp/AE"]
    rows = [
        [
            r["D"],
            r["hidden"],
            f(r["ms"]["fff_vjp"]),
            f(r["ms"]["fff_jvp"]),
            f(r["ms"]["ae"]),
            f(r["jvp_over_vjp"]),
            f(r["vjp_over_ae"]),
            f(r["jvp_over_ae"]),
        ]
        for r in p["rows"]
    ]
    e0, e1 = p["environment_start"], p["environment_end"]
    c = p["compile"]
    comp = [
        [
            k,
            c.get(k + "+compile", "–"),
            f(c["ms"].get(k, float("nan"))),
            f(c["ms"].get(k + "+compile", float("nan"))),
        ]
        for k in ("fff_vjp", "fff_jvp", "ae")
    ]
    return (
        "### Surrogate: `vjp` (default) vs `jvp`\n\n"
        f"Loss + backward (no optimiser), batch {p['batch']}, `torch.set_num_threads(1)`, load average "
        f"{e0['loadavg'][0]} at start, {e1['loadavg'][0]} at end. Medians over interleaved repeats; "
        "ratios are medians of per-repeat ratios.\n\n"
        + common.table(head, rows)
        + f"\n\n`torch.compile` (inductor) of the loss at D = {c['D']}:\n\n"
        + common.table(["variant", "compile", "eager [ms]", "compiled [ms]"], comp)
    )


if __name__ == "__main__":
    common.main(run, __doc__)
