r"""The error of the free-form surrogate gradient, measured against exact log-determinants.

The free-form flow trains its encoder with the gradient of
:math:`\operatorname{tr}(J_f\,\mathrm{sg}(J_g))` (in expectation over the Hutchinson probe) in place
of that of :math:`\log\lvert\det J_f\rvert`. The two agree where :math:`J_g = J_f^{-1}`; per
parameter :math:`\theta_k` and data point the difference is

.. math:: e_k = \operatorname{tr}\bigl((J_g J_f - I)\,J_f^{-1}\partial_k J_f\bigr),
   \qquad \lvert e_k\rvert \le \lVert J_g J_f - I\rVert_F\,\lVert J_f^{-1}\partial_k J_f\rVert_F ,

so over all parameters :math:`\lVert e\rVert \le \lVert J_g J_f - I\rVert_F\, C(x)` with
:math:`C(x)^2 = \sum_k \lVert J_f^{-1}\partial_k J_f\rVert_F^2`, and for a batch mean
:math:`\lVert \bar e\rVert \le \operatorname{mean}_i \lVert A_i\rVert_F\, C(x_i)`: linear in the
inverse defect (Draxler et al. 2024, arXiv:2310.16624, Theorem 4.2, bound the error linearly in
it). On small D everything is exact (full Jacobians, float64 copies of the model), so this
script measures, at snapshots of training runs over several β:

* ``g_exact``: the gradient, in the encoder's parameters, of the batch mean of
  :math:`\log\lvert\det J_f\rvert`;
* ``g_sur``: the expected surrogate gradient, that of the batch mean of
  :math:`\operatorname{tr}(J_f\,\mathrm{sg}(J_g))`, and ``g_mc``, that of the one-probe surrogate
  the model trains with;
* the relative errors :math:`\lVert g_{sur} - g_{exact}\rVert / \lVert g_{exact}\rVert` and the
  same relative to the whole NLL gradient (latent term included);
* the bound above, evaluated exactly (``C`` from per-row parameter Jacobians);
* the inverse defect, exact (:math:`\lVert A_i\rVert_F^2` from full Jacobians) and estimated
  (:meth:`~freeflows.FreeFormFlow.inverse_defect`, one probe per row, with its standard error).

Writes ``<out>/estimator_error.{json,md}`` and ``<img>/estimator-error-*.png``.

    python benchmarks/estimator_error.py            # the reported run, ~10 CPU-minutes
    python benchmarks/estimator_error.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, jacrev, vmap

import freeflows as ff
from freeflows.data.toy import GaussianMixture, two_moons

ROOT = Path(__file__).resolve().parent
DOCS_IMG = ROOT.parent / "docs" / "img"


# -- data -----------------------------------------------------------------------------------------
def mixture_6d(seed: int) -> GaussianMixture:
    """Five isotropic Gaussians in 6-D, means drawn from N(0, 2^2 I) (fixed seed), std 0.5."""
    g = torch.Generator().manual_seed(1000 + seed)
    means = 2.0 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    return GaussianMixture(means, torch.full((5,), 0.5), torch.ones(5))


def sampler(name: str, seed: int):  # noqa: ANN201
    if name == "two-moons":
        return two_moons
    if name == "mixture-6d":
        return mixture_6d(seed).sample
    raise ValueError(f"unknown data set {name!r}; choose two-moons or mixture-6d")


DIMS = {"two-moons": 2, "mixture-6d": 6}


# -- the measurements ----------------------------------------------------------------------------
def _grad(value: Tensor, params: list[Tensor], retain: bool = True) -> Tensor:
    """The flattened gradient; parameters the value does not depend on (the encoder's last bias
    does not move a Jacobian) get zeros."""
    grads = torch.autograd.grad(value, params, retain_graph=retain, allow_unused=True)
    flat = [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
    return torch.cat(flat)


def bound_constants(encoder: torch.nn.Module, x: Tensor, jf_inv: Tensor, chunk: int = 32) -> Tensor:
    r""":math:`C(x_i)^2 = \sum_k \lVert J_f^{-1}\partial_k J_f\rVert_F^2` per row (``J_f^{-1}``
    held fixed), from per-row Jacobians of :math:`W J_f(x;\theta)` in the parameters."""
    params = {k: v.detach() for k, v in encoder.named_parameters()}

    def wj(p: dict[str, Tensor], xi: Tensor, w: Tensor) -> Tensor:
        jac = jacrev(lambda u: functional_call(encoder, p, (u[None],))[0])(xi)
        return (w @ jac).reshape(-1)

    per_row = vmap(jacrev(wj), in_dims=(None, 0, 0), chunk_size=chunk)(params, x, jf_inv)
    return sum(t.reshape(x.shape[0], -1).square().sum(1) for t in per_row.values())


def measure(flow: ff.FreeFormFlow, x: Tensor, gen: torch.Generator) -> dict[str, float]:
    """Exact and surrogate gradients, the bound, and the inverse defect on the batch ``x``."""
    flow = copy.deepcopy(flow).double()
    x = x.double()
    enc = [p for p in flow.encoder.parameters()]
    jf = ff.batch_jacobian(flow.encode, x, module=flow.encoder)  # [n, D, D], graph to the parameters
    z = flow.encode(x)
    with torch.no_grad():
        jg = ff.batch_jacobian(flow.decode, z, module=flow.decoder)
        x_hat = flow.decode(z)
    log_det = torch.linalg.slogdet(jf).logabsdet.mean()
    trace = (jf * jg.transpose(1, 2)).sum(dim=(1, 2)).mean()  # tr(J_f sg(J_g))
    n, d = x.shape
    v = torch.randn(n, d, generator=gen, dtype=x.dtype)
    one_probe = torch.einsum("ni,nij,nj->n", v, jf, (jg @ v[..., None])[..., 0]).mean()
    latent_nll = -flow.latent.log_prob(z).mean()
    g_exact = _grad(log_det, enc)
    g_sur = _grad(trace, enc)
    g_mc = _grad(one_probe, enc)
    g_lat = _grad(latent_nll, enc, retain=False)
    nll_exact, nll_sur = g_lat - g_exact, g_lat - g_sur

    with torch.no_grad():
        eye = torch.eye(d, dtype=x.dtype)
        defect_sq = (jg @ jf - eye).square().sum(dim=(1, 2))  # ||A_i||_F^2, exact
        jf_inv = torch.linalg.inv(jf)
    c_sq = bound_constants(flow.encoder, x, jf_inv.detach())
    bound = (defect_sq.sqrt() * c_sq.sqrt()).mean()
    with torch.no_grad():
        estimate = flow.inverse_defect(x, probes=1, generator=gen)
    error = (g_sur - g_exact).norm()
    return {
        "defect_sq_exact": float(defect_sq.mean()),
        "defect_rms_exact": float(defect_sq.mean().sqrt()),
        "defect_sq_estimate": float(estimate.mean()),
        "defect_sq_estimate_se": float(estimate.std() / math.sqrt(n)),
        "reconstruction": float((x - x_hat).square().sum(1).mean()),
        "grad_norm_logdet": float(g_exact.norm()),
        "grad_norm_nll": float(nll_exact.norm()),
        "rel_error_expected": float(error / g_exact.norm()),
        "rel_error_expected_nll": float(error / nll_exact.norm()),
        "rel_error_one_probe": float((g_mc - g_exact).norm() / g_exact.norm()),
        "rel_bound": float(bound / g_exact.norm()),
        "bound_holds": bool(error <= bound * (1 + 1e-9)),
        "cosine_nll": float(torch.dot(nll_sur, nll_exact) / (nll_sur.norm() * nll_exact.norm())),
    }


# -- a run ---------------------------------------------------------------------------------------
def run(
    data: str, beta: float, steps: int, every: int, seed: int, n_eval: int, hidden: int, lr: float
) -> list[dict[str, Any]]:
    """Train a free-form flow with ``beta`` for ``steps`` Adam steps (batch 256), measuring every
    ``every`` steps on a fixed batch of ``n_eval`` points."""
    torch.manual_seed(seed)
    d = DIMS[data]
    draw = sampler(data, seed)
    flow = ff.FreeFormFlow.resnet(d, hidden=hidden, blocks=2, beta=beta)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    g_data = torch.Generator().manual_seed(seed)
    x_eval = draw(n_eval, torch.Generator().manual_seed(10_000 + seed))
    g_probe = torch.Generator().manual_seed(20_000 + seed)
    rows = []
    for step in range(steps + 1):
        if step % every == 0:
            rows.append({"data": data, "beta": beta, "step": step, **measure(flow, x_eval, g_probe)})
        if step == steps:
            break
        opt.zero_grad()
        flow.loss(draw(256, g_data)).value.backward()
        opt.step()
    return rows


# -- the report ----------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:.3g}"


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = result["rows"]
    last = [r for r in rows if r["step"] == cfg["steps"]]
    lines = [
        "### Error of the free-form surrogate gradient",
        "",
        f"Free-form flows (`FreeFormFlow.resnet`, hidden {cfg['hidden']}, 2 blocks) trained "
        f"{cfg['steps']} Adam steps (lr {cfg['lr']}, batch 256, float32) per data set and β, seed "
        f"{cfg['seed']}; measured in float64 every {cfg['every']} steps on a fixed batch of "
        f"{cfg['n_eval']} data points. CPU time {result['cpu_seconds']:.0f} s, one thread.",
        "",
        "Columns: `‖A‖_F` is the RMS over the batch of the exact inverse defect "
        "‖J_g J_f − I‖_F; `est. ‖A‖²` is `FreeFormFlow.inverse_defect` (one Gaussian probe per row) "
        "± its standard error, against the exact batch mean of ‖A‖²_F; `rel. err.` is "
        "‖g_sur − g_exact‖ / ‖g_exact‖ for the gradient of the log-determinant term in the encoder's "
        "parameters, with the expected surrogate; `rel. err. (NLL)` the same error relative to the "
        "whole NLL gradient; `1 probe` the relative error of the one-probe surrogate that training "
        "uses (mostly Monte-Carlo noise); `bound` the Cauchy–Schwarz bound mean_i ‖A_i‖_F C(x_i) "
        "relative to ‖g_exact‖.",
        "",
        f"At the end of training (step {cfg['steps']}):",
        "",
        "| data | β | ‖A‖_F | exact ‖A‖² | est. ‖A‖² | recon. | rel. err. | rel. err. (NLL) | cos (NLL) "
        "| 1 probe | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in last:
        lines.append(
            f"| {r['data']} | {r['beta']:g} | {_fmt(r['defect_rms_exact'])} | {_fmt(r['defect_sq_exact'])} | "
            f"{_fmt(r['defect_sq_estimate'])} ± {_fmt(r['defect_sq_estimate_se'])} | "
            f"{_fmt(r['reconstruction'])} | {_fmt(r['rel_error_expected'])} | "
            f"{_fmt(r['rel_error_expected_nll'])} | {r['cosine_nll']:.4f} | "
            f"{_fmt(r['rel_error_one_probe'])} | {_fmt(r['rel_bound'])} |"
        )
    s = result["summary"]
    lines += [
        "",
        f"Over all {s['snapshots']} snapshots after step 0: the bound held at {s['bound_holds']} of them; "
        f"the estimator was within 3 standard errors of the exact value at {s['estimate_within_3se']} "
        f"(within 2 at {s['estimate_within_2se']}). "
        f"Least-squares slope of log(rel. err.) on log(‖A‖_F): {s['slope']:.2f} "
        f"(1 is linear scaling); median ratio rel. err. / ‖A‖_F: {s['median_ratio']:.3g}; "
        f"median ratio bound / rel. err.: {s['median_bound_ratio']:.3g}.",
        "",
        "Over training (every snapshot):",
        "",
        "| data | β | step | ‖A‖_F | rel. err. | bound | recon. |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["step"] == 0:
            continue
        lines.append(
            f"| {r['data']} | {r['beta']:g} | {r['step']} | {_fmt(r['defect_rms_exact'])} | "
            f"{_fmt(r['rel_error_expected'])} | {_fmt(r['rel_bound'])} | {_fmt(r['reconstruction'])} |"
        )
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    after = [r for r in rows if r["step"] > 0 and r["defect_rms_exact"] > 0 and r["rel_error_expected"] > 0]
    xs = torch.tensor([math.log(r["defect_rms_exact"]) for r in after])
    ys = torch.tensor([math.log(r["rel_error_expected"]) for r in after])
    slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / (xs - xs.mean()).square().sum())
    z = [abs(r["defect_sq_estimate"] - r["defect_sq_exact"]) / max(r["defect_sq_estimate_se"], 1e-300)
         for r in after]

    def median(values: list[float]) -> float:
        return float(torch.tensor(values).median())

    return {
        "snapshots": len(after),
        "bound_holds": sum(r["bound_holds"] for r in after),
        "estimate_within_3se": sum(v <= 3 for v in z),
        "estimate_within_2se": sum(v <= 2 for v in z),
        "slope": slope,
        "median_ratio": median([r["rel_error_expected"] / r["defect_rms_exact"] for r in after]),
        "median_bound_ratio": median([r["rel_bound"] / r["rel_error_expected"] for r in after]),
    }


def plots(result: dict[str, Any], img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cfg = result["rows"], result["config"]
    datasets = cfg["datasets"]
    betas = cfg["betas"]
    cmap = plt.get_cmap("viridis")
    colour = {b: cmap(i / max(1, len(betas) - 1)) for i, b in enumerate(betas)}
    img.mkdir(parents=True, exist_ok=True)
    out = []

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.2), squeeze=False)
    for ax, data in zip(axes[0], datasets, strict=True):
        allx = []
        for b in betas:
            rs = [r for r in rows if r["data"] == data and r["beta"] == b and r["step"] > 0]
            x = [r["defect_rms_exact"] for r in rs]
            allx += x
            ax.plot(x, [r["rel_error_expected"] for r in rs], "o-", color=colour[b], ms=3, label=f"β = {b:g}")
            ax.plot(x, [r["rel_bound"] for r in rs], "x:", color=colour[b], ms=3, lw=0.8)
            ax.plot(x[-1:], [rs[-1]["rel_error_expected"]], "o", color=colour[b], ms=7, mfc="none")
        lo, hi = min(allx), max(allx)
        ref = result["summary"]["median_ratio"]
        ax.plot([lo, hi], [ref * lo, ref * hi], "k--", lw=0.8, label="slope 1")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("‖J_g J_f − I‖_F (RMS over the batch, exact)")
        ax.set_ylabel("relative error of the log-det gradient")
        ax.set_title(f"{data}: over training (dots), bound (crosses)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = img / "estimator-error-training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.0))
    for i, data in enumerate(datasets):
        marker, col = "os^v"[i % 4], f"C{i}"
        last = [r for r in rows if r["data"] == data and r["step"] == cfg["steps"]]
        bs = [r["beta"] for r in last]
        exact = [r["defect_rms_exact"] for r in last]
        axes[0].plot(bs, exact, marker + "-", color=col, label=f"{data}: exact")
        axes[0].plot(
            bs, [math.sqrt(max(r["defect_sq_estimate"], 0)) for r in last], marker, mfc="none", ms=10,
            color="k", label=f"{data}: estimator (1 probe)",
        )
        error, bound = [r["rel_error_expected"] for r in last], [r["rel_bound"] for r in last]
        axes[1].plot(bs, error, marker + "-", color=col, label=f"{data}: measured")
        axes[1].plot(bs, bound, marker + ":", color=col, mfc="none", label=f"{data}: bound")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("β")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("‖J_g J_f − I‖_F (RMS)")
    axes[1].set_ylabel("relative error of the log-det gradient")
    axes[0].set_title(f"inverse defect after {cfg['steps']} steps")
    axes[1].set_title(f"gradient error after {cfg['steps']} steps")
    fig.tight_layout()
    path = img / "estimator-error-beta.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["two-moons", "mixture-6d"], choices=sorted(DIMS))
    p.add_argument("--betas", nargs="+", type=float, default=[1.0, 3.0, 10.0, 30.0, 100.0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=300)
    p.add_argument("--n-eval", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: 40 steps, snapshots every 20")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--img", type=Path, default=DOCS_IMG)
    p.add_argument("--replot", type=Path, metavar="JSON", help="redraw the plots of a result file and stop")
    args = p.parse_args(argv)
    if args.replot:
        for path in plots(json.loads(args.replot.read_text()), args.img):
            print(f"wrote {path}")
        return 0
    if args.quick:
        args.steps, args.every, args.n_eval = 40, 20, 64
    if args.steps < 1 or args.every < 1 or args.steps % args.every:
        p.error("--steps and --every must be positive, and --every must divide --steps")
    if any(not b >= 0 for b in args.betas):
        p.error("--betas must be >= 0")
    torch.set_num_threads(1)
    t0 = time.process_time()
    rows = []
    for data in args.datasets:
        for beta in args.betas:
            t = time.process_time()
            rows += run(data, beta, args.steps, args.every, args.seed, args.n_eval, args.hidden, args.lr)
            last = rows[-1]
            print(
                f"{data} beta={beta:g}: |A|_F={last['defect_rms_exact']:.3g} "
                f"rel.err={last['rel_error_expected']:.3g} bound={last['rel_bound']:.3g} "
                f"({time.process_time() - t:.0f} CPU-s)",
                flush=True,
            )
    result = {
        "config": {
            "datasets": args.datasets, "betas": args.betas, "steps": args.steps, "every": args.every,
            "n_eval": args.n_eval, "hidden": args.hidden, "lr": args.lr, "seed": args.seed,
        },
        "cpu_seconds": time.process_time() - t0,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "rows": rows,
    }
    result["summary"] = summarise(rows)
    name = "estimator_error_quick" if args.quick else "estimator_error"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}.md").write_text(markdown(result))
    if not args.quick:
        for path in plots(result, args.img):
            print(f"wrote {path}")
    print(f"wrote {args.out / name}.{{json,md}} ({result['cpu_seconds']:.0f} CPU-s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
