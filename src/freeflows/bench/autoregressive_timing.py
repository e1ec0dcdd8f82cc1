"""Sampling time and density time of MAF, IAF, RealNVP and the free-form flow, side by side.

An autoregressive layer is one network pass in one direction and ``D`` sequential passes in the
other (see :mod:`freeflows.transforms.autoregressive`):

* MAF: density one pass per layer, sampling ``D`` passes per layer;
* IAF: sampling one pass per layer, density ``D`` passes per layer;
* RealNVP (affine couplings): one pass per layer both ways;
* free-form flow: sampling is one decoder pass; the density (``log_prob(x, variant="paper")``)
  needs the decoder's full ``D × D`` Jacobian (``D`` forward-mode products, batched).

All models are untrained, with their default sizes, at D = 2, 16 and 64. Each call is
``sample(n)`` or ``log_prob(x)`` of ``n`` = 1000 points, without gradients for the exact flows;
the free-form flow's ``log_prob`` runs with autograd on, as in the tool's evaluation. Per D, the
eight calls (four models, two directions) run interleaved over 11 repeats after a warm-up call,
single thread, timed with the process's CPU time; each time is a median, each ratio the median of
per-repeat ratios. Writes ``<out>/autoregressive_timing.json`` and ``.md``.

    freeflows bench autoregressive_timing [--quick]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import common

NAME = "autoregressive_timing"
DIMS = (2, 16, 64)
BATCH = 1000
REPEATS = 11
SEED = 0


def _models() -> dict[str, Callable[[int], nn.Module]]:
    from ..flows import IAF, MAF, RealNVP
    from ..freeform import FreeFormFlow

    return {
        "maf": lambda d: MAF(d),
        "iaf": lambda d: IAF(d),
        "realnvp": lambda d: RealNVP(d),
        "fff": lambda d: FreeFormFlow.resnet(d),
    }


MODELS = ("maf", "iaf", "realnvp", "fff")

#: ``key: (numerator, denominator)`` of the ratios reported per D, as ``(model, direction)``.
RATIOS = {
    "maf_sample_over_maf_density": (("maf", "sample"), ("maf", "density")),
    "iaf_density_over_iaf_sample": (("iaf", "density"), ("iaf", "sample")),
    "maf_sample_over_realnvp_sample": (("maf", "sample"), ("realnvp", "sample")),
    "iaf_density_over_realnvp_density": (("iaf", "density"), ("realnvp", "density")),
    "fff_density_over_realnvp_density": (("fff", "density"), ("realnvp", "density")),
    "fff_sample_over_realnvp_sample": (("fff", "sample"), ("realnvp", "sample")),
}


def calls(kind: str, dim: int, batch: int) -> tuple[nn.Module, dict[str, Callable[[], Any]]]:
    """An untrained model of ``kind`` at ``dim`` and its two timed calls.

    Args:
        kind: one of :data:`MODELS`.
        dim: the data dimension D.
        batch: points per call.

    Returns:
        The model and ``{"sample": ..., "density": ...}``, each drawing or scoring ``batch`` points.
    """
    torch.manual_seed(SEED)
    model = _models()[kind](dim).eval()
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(SEED))

    def sample() -> None:
        with torch.no_grad():
            model.sample(batch)

    def density() -> None:
        if kind == "fff":
            model.log_prob(x, variant="paper")
        else:
            with torch.no_grad():
                model.log_prob(x)

    log_q = model.log_prob(x, variant="paper") if kind == "fff" else model.log_prob(x)
    if not torch.isfinite(log_q).all():
        raise RuntimeError(f"{kind} at D={dim}: non-finite log_prob")
    return model, {"sample": sample, "density": density}


def run(out_dir: str = str(common.DEFAULT_OUT), quick: bool = False) -> dict[str, Any]:
    """Time sampling and density of the four models at every D and write the result files.

    Args:
        out_dir: results directory; ``autoregressive_timing.json`` and ``.md`` are written there.
        quick: D = 2 and 16 only, 200 points per call, 3 repeats (a smoke run).

    Returns:
        The JSON payload, with its Markdown table under ``"markdown"``.
    """
    common.setup()
    env_start = common.environment()
    dims = (2, 16) if quick else DIMS
    batch = 200 if quick else BATCH
    repeats = 3 if quick else REPEATS
    rows: list[dict[str, Any]] = []
    ratios: dict[str, dict[str, float]] = {}
    for dim in dims:
        fns: dict[str, Callable[[], Any]] = {}
        params: dict[str, int] = {}
        for kind in MODELS:
            model, pair = calls(kind, dim, batch)
            params[kind] = sum(p.numel() for p in model.parameters())
            fns.update({f"{kind} {direction}": fn for direction, fn in pair.items()})
        t = common.interleaved(fns, repeats, warmup=1)
        for kind in MODELS:
            rows.append(
                {
                    "kind": kind,
                    "dim": dim,
                    "n_params": params[kind],
                    "sample_seconds": common.median(t[f"{kind} sample"]),
                    "density_seconds": common.median(t[f"{kind} density"]),
                }
            )
            r = rows[-1]
            print(
                f"D={dim:3d} {kind:8s} sample {1e3 * r['sample_seconds']:8.2f} ms CPU  "
                f"density {1e3 * r['density_seconds']:8.2f} ms CPU",
                flush=True,
            )
        ratios[str(dim)] = {
            key: common.paired_ratio(t[" ".join(num)], t[" ".join(den)]) for key, (num, den) in RATIOS.items()
        }
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "quick": quick,
        "clock": common.CLOCK,
        "settings": {
            "command": f"freeflows bench {NAME}" + (" --quick" if quick else ""),
            "dims": list(dims),
            "batch": batch,
            "repeats": repeats,
            "threads": 1,
            "seed": SEED,
        },
        "environment_start": env_start,
        "environment_end": common.environment(),
        "rows": rows,
        "ratios": ratios,
    }
    payload["markdown"] = markdown(payload)
    return common.write(out_dir, NAME, payload, payload["markdown"])


def markdown(result: dict[str, Any]) -> str:
    """The Markdown report: times per model and D, and the ratios of the sequential directions.

    Args:
        result: the payload of :func:`run`.
    """
    s = result["settings"]
    e0, e1 = result["environment_start"], result["environment_end"]
    lines = [
        "# Sampling vs density time: MAF, IAF, RealNVP, free-form flow",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Untrained models with default sizes; {s['batch']} points per call; median of {s['repeats']} "
        f"interleaved repeats after a warm-up; {s['threads']} torch thread; torch {e0['torch']}, "
        f"{e0['machine']}. Times are the process's CPU time (`time.process_time`); load average "
        f"{e0['loadavg'][0]} at start, {e1['loadavg'][0]} at end.",
        "",
        "| D | model | params | sample ms | density ms |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['dim']} | {r['kind']} | {r['n_params']:,} | {1e3 * r['sample_seconds']:.2f} "
            f"| {1e3 * r['density_seconds']:.2f} |"
        )
    lines += [
        "",
        "Ratios of CPU times, medians of per-repeat ratios (the O(D)-sequential direction of each "
        "autoregressive flow):",
        "",
        "| D | MAF sample / MAF density | IAF density / IAF sample | MAF sample / RealNVP sample "
        "| IAF density / RealNVP density | FFF density / RealNVP density |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    shown = list(RATIOS)[:5]
    for d, q in result["ratios"].items():
        lines.append(f"| {d} | " + " | ".join(f"{q.get(k, float('nan')):.1f}×" for k in shown) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    common.main(run, __doc__)
