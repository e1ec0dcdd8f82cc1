"""Decoder-Jacobian throughput of a free-form flow: vmap(jacfwd) vs vmap(jacrev) vs a naive loop.

``FreeFormFlow.log_prob(variant="paper")`` (one encoder pass, the full decoder Jacobian per row,
slogdet; the building block of every free-form density, measured on random weights where a root
solve would not be meaningful; the normalised density's cost relative to it is measured on
trained models by ``freeflows bench density_cost``) with ``jacobian_mode="auto"`` (one structured
forward pass with D tangents,
:mod:`freeflows.tangents`), ``"forward"`` (chunked ``vmap(jacfwd)``) and ``"reverse"`` (chunked
``vmap(jacrev)``), all under ``torch.no_grad()``; the naive baseline builds the same Jacobian row
by row with ``D`` backward passes through the decoder. ``auto+grad`` is ``"auto"`` with autograd
enabled (as the runner's validation calls it; the result is then differentiable in the
parameters, which costs a graph). Networks as in ``train_step``; single thread; samples per
second, medians over interleaved repeats.

    freeflows bench log_prob [--quick]
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from . import common
from .nets import flow, hidden

NAME = "log_prob"
DIMS = (2, 8, 32, 128, 512)
REPEATS = {2: 20, 8: 20, 32: 12, 128: 6, 512: 3}
VARIANTS = ("auto", "jacfwd", "jacrev", "naive", "auto+grad")


SMALL_BATCH = 16


def batch_size(dim: int) -> int:
    """The usual batch at data dimension ``dim``: 256 up to D = 128, 64 above.

    Args:
        dim: the data dimension D.
    """
    return 256 if dim <= 128 else 64


def configs(quick: bool) -> list[tuple[int, int]]:
    """``(D, batch)``: the usual batch at every D, and a small batch (where the naive loop's
    per-pass overhead dominates) at D >= 32."""
    if quick:
        return [(2, 256), (32, 256), (32, SMALL_BATCH)]
    return [(d, batch_size(d)) for d in DIMS] + [(d, SMALL_BATCH) for d in DIMS if d >= 32]


def jacobian_gflop(dim: int, batch: int) -> float:
    """Multiply-adds of the D tangent (or cotangent) products through the decoder's linear
    layers, x2: the arithmetic every method here has to do (the naive loop and the vectorised
    ones alike; the primal pass and slogdet are extra and small)."""
    from .nets import BLOCKS, DEPTH

    h = hidden(dim)
    macs_per_row = BLOCKS * (dim * h + (DEPTH - 1) * h * h + h * dim)
    return 2 * batch * dim * macs_per_row / 1e9


def matmul_gflops(dim: int, repeats: int = 5) -> float:
    """Single-thread throughput of one large matmul of the decoder's hidden size (the roofline)."""
    h = hidden(dim)
    a, w = torch.randn(8192, h), torch.randn(h, h)
    t = common.interleaved({"mm": lambda: a @ w}, repeats, warmup=1)["mm"]
    return 2 * 8192 * h * h / common.median(t) / 1e9


def naive_log_prob(model: Any, x: Tensor) -> Tensor:
    """The Jacobian of the decoder row by row: ``D`` backward passes (the baseline)."""
    with torch.enable_grad():
        z = model.encode(x).detach().requires_grad_(True)
        out = model.decode(z).reshape(x.shape[0], -1)
        ones = torch.ones(x.shape[0], dtype=x.dtype)
        rows = [torch.autograd.grad(out[:, i], z, ones, retain_graph=True)[0] for i in range(out.shape[1])]
    jac = torch.stack(rows, dim=1)
    return model.latent.log_prob(z.detach()) - torch.linalg.slogdet(jac).logabsdet


def variants(dim: int, batch: int) -> dict[str, Any]:
    """The timed calls of every variant on one random batch, the vectorised ones first checked
    against the naive loop (an ``AssertionError`` if one differs by 1e-3 or more).

    The model is :func:`~freeflows.bench.nets.flow` with random weights of scale ``0.3 / sqrt(fan-in)``
    (so that nothing is trivially structured); every variant but ``naive`` calls
    ``log_prob(x, variant="paper")`` with its ``jacobian_mode``.

    Args:
        dim: the data dimension D.
        batch: the rows per call.

    Returns:
        ``{variant: call}`` for the variants of :data:`VARIANTS`.
    """
    model = flow(dim)
    # a generic (non-identity) pair, so that nothing is trivially structured
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 / p.shape[-1] ** 0.5)
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1))

    def mode(m: str, grad: bool = False):
        def fn() -> Tensor:
            model.jacobian_mode = m
            with torch.set_grad_enabled(grad):
                return model.log_prob(x, variant="paper")

        return fn

    fns = {
        "auto": mode("auto"),
        "jacfwd": mode("forward"),
        "jacrev": mode("reverse"),
        "naive": lambda: naive_log_prob(model, x),
        "auto+grad": mode("auto", grad=True),
    }
    ref = fns["naive"]()
    for name in ("auto", "jacfwd", "jacrev"):
        err = (fns[name]() - ref).abs().max().item()
        if not err < 1e-3:
            raise AssertionError(f"{name} log_prob differs from the naive loop by {err}")
    return fns


PROFILED = ("auto", "naive")


def profiles(dims: tuple[int, ...]) -> dict[str, Any]:
    """torch.profiler summaries of ``auto`` and ``naive`` at the usual batch: where the time of
    each goes (the evidence for the roofline argument in the README)."""
    out: dict[str, Any] = {}
    for dim in dims:
        fns = variants(dim, batch_size(dim))
        out[str(dim)] = {v: common.op_profile(fns[v]) for v in PROFILED}
    return out


def run(out_dir: str = str(common.DEFAULT_OUT), quick: bool = False) -> dict[str, Any]:
    """Time ``log_prob`` of every variant at every configuration of :func:`configs`, profile
    ``auto`` and ``naive``, and write the result files.

    Args:
        out_dir: results directory; ``log_prob.json`` and ``.md`` are written there.
        quick: three configurations, 3 repeats and the profile at D = 32 only (a smoke run).

    Returns:
        The JSON payload, with its Markdown tables under ``"markdown"``.
    """
    common.setup()
    env_start = common.environment()
    profile = profiles((32,) if quick else (32, 128))
    rows = []
    for dim, n in configs(quick):
        repeats = 3 if quick else REPEATS[dim] * (2 if n == SMALL_BATCH else 1)
        t = common.interleaved(variants(dim, n), repeats, warmup=1)
        rows.append(
            {
                "D": dim,
                "hidden": hidden(dim),
                "batch": n,
                "repeats": repeats,
                "samples_per_s": {k: n / common.median(v) for k, v in t.items()},
                "speedup_over_naive": {k: common.paired_ratio(t["naive"], v) for k, v in t.items()},
                "gflop_per_s": {k: jacobian_gflop(dim, n) / common.median(v) for k, v in t.items()},
                "matmul_gflop_per_s": matmul_gflops(dim),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
            }
        )
        print(rows[-1], flush=True)
    payload = {
        "benchmark": NAME,
        "quick": quick,
        "clock": common.CLOCK,
        "environment_start": env_start,
        "environment_end": common.environment(),
        "rows": rows,
        "op_profile": profile,
    }
    payload["markdown"] = markdown(payload)
    return common.write(out_dir, NAME, payload, payload["markdown"])


def markdown(p: dict[str, Any]) -> str:
    """The Markdown report: throughput, speed-ups over the naive loop and GFLOP/s per configuration,
    then the operator profiles.

    Args:
        p: the payload of :func:`run`.
    """
    f = common.fmt
    ratios = ("auto", "jacfwd", "jacrev")
    head = (
        ["D", "hidden", "batch"] + [f"{v} [samples/s]" for v in VARIANTS] + [f"{v} / naive" for v in ratios]
    )
    head.append("GFLOP/s auto / naive / matmul")
    rows = []
    for r in p["rows"]:
        gf = (r["gflop_per_s"]["auto"], r["gflop_per_s"]["naive"], r["matmul_gflop_per_s"])
        rows.append(
            [r["D"], r["hidden"], r["batch"]]
            + [f(r["samples_per_s"][v]) for v in VARIANTS]
            + [f(r["speedup_over_naive"][v]) for v in ratios]
            + [" / ".join(f(x) for x in gf)]
        )
    e0, e1 = p["environment_start"], p["environment_end"]
    return (
        "### Exact log_prob throughput\n\n"
        "`FreeFormFlow.log_prob` (decoder Jacobian + slogdet) under `torch.no_grad()`: `auto` "
        "(structured forward pass with D tangents), chunked `vmap(jacfwd)` / `vmap(jacrev)`, vs a loop "
        "of D backward passes; `auto+grad` with autograd on. `torch.set_num_threads(1)`, CPU time, "
        f"load average {e0['loadavg'][0]} at start, {e1['loadavg'][0]} at end. GFLOP/s counts only "
        "the D Jacobian products through the decoder's linear layers (the same arithmetic for every "
        "method); `matmul` is one large single-thread matmul of the hidden size, the roofline.\n\n"
        + common.table(head, rows)
        + "\n\ntorch.profiler, self CPU time of aten operators per `log_prob` call (batch as above; "
        "share of all aten self time):\n\n"
        + common.table(["D", "variant", "aten calls", "top operators (share)"], profile_rows(p))
    )


def profile_rows(p: dict[str, Any]) -> list[list[Any]]:
    """The rows of the profile table: D, variant, aten calls per call and the top five operators with
    their share of the aten self time.

    Args:
        p: the payload of :func:`run`.
    """
    rows = []
    for dim, by_variant in p.get("op_profile", {}).items():
        for variant, prof in by_variant.items():
            top = ", ".join(f"{o['op'][6:]} {100 * o['share']:.0f}%" for o in prof["top_self_cpu"][:5])
            rows.append([dim, variant, f"{prof['aten_calls_per_step']:.0f}", top])
    return rows


if __name__ == "__main__":
    common.main(run, __doc__)
