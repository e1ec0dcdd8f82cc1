"""Why the normalised free-form density loses to zuko's NSF on a toy: where the draws go, and
where the normalised and paper values part.

Trains the preset's free-form flow and ``zuko.flows.NSF`` side by side at equal CPU time (the
loop of :mod:`peer_baseline`, as :mod:`peer_toys` does), then reports, for each model:

* the fraction of 20,000 draws that fall where the true log-density is below its 1 % quantile
  over the test split (the truth itself puts 1 % there): mass leaking off the data;
* the reverse KL(q‖p) = E_q[log q − log p] from those draws (``sample_and_log_prob``, exact for
  both models);

and, for the free-form flow on the test split, the difference between the paper's value
log p_Z(f(x)) − log|det J_g(f(x))| (not normalised) and the normalised log-density, binned by
the reconstruction error ‖g(f(x)) − x‖ (the two agree where g inverts f).

Writes ``<out>/peer_diagnose.{json,md}``.

    python benchmarks/peer_diagnose.py --dataset eight-gaussians --cpu-seconds 60 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from peer_baseline import TrainSettings, train_side_by_side
from peer_toys import ROOT, build_contenders

BINS = (0.0, 0.01, 0.03, 0.1, float("inf"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="eight-gaussians", choices=["eight-gaussians", "gaussian-mixture-1d"])
    p.add_argument("--cpu-seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=20000)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data, contenders, cfg, _ = build_contenders(args.dataset, args.seed, ["fff", "nsf"], [])
    settings = TrainSettings(
        lr=cfg["optim"]["lr"],
        batch_size=cfg["trainer"]["batch_size"],
        grad_clip=cfg["optim"]["grad_clip"],
        cpu_seconds=args.cpu_seconds,
        budget="cpu",
    )
    trainees = train_side_by_side(contenders, data.train.x, settings, args.seed)
    fff, nsf = contenders[0].model, contenders[1].model.flow
    true_log_prob = data.true_log_prob
    threshold = float(torch.quantile(true_log_prob(data.test.x), 0.01))
    torch.manual_seed(args.seed + 1)
    with torch.no_grad():
        draws = {
            "fff": fff.sample_and_log_prob(args.draws),
            "zuko NSF": nsf().rsample_and_log_prob((args.draws,)),
        }
    models: dict[str, Any] = {}
    for (name, (x, log_q)), t in zip(draws.items(), trainees, strict=True):
        log_p = true_log_prob(x)
        rkl = log_q - log_p
        models[name] = {
            "steps": t.steps,
            "cpu_seconds": t.cpu_seconds,
            "fraction_below_1pct_quantile": float((log_p < threshold).double().mean()),
            "reverse_kl": float(rkl.double().mean()),
            "reverse_kl_stderr": float(rkl.double().std() / len(rkl) ** 0.5),
        }
    x = data.test.x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        normalised = fff.log_prob(x).detach()
    paper = fff.log_prob(x, variant="paper").detach()
    with torch.no_grad():
        rec = (fff.decode(fff.encode(x)) - x).reshape(x.shape[0], -1).norm(dim=1)
    ok = torch.isfinite(normalised)
    gap, rec = (paper - normalised)[ok], rec[ok]
    bins = []
    for lo, hi in zip(BINS[:-1], BINS[1:], strict=True):
        m = (rec >= lo) & (rec < hi)
        bins.append(
            {
                "low": lo,
                "high": hi,
                "rows": int(m.sum()),
                "mean_gap": float(gap[m].mean()) if m.any() else None,
            }
        )
    result = {
        "command": "python benchmarks/peer_diagnose.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": args.dataset,
        "seed": args.seed,
        "cpu_seconds": args.cpu_seconds,
        "n_train": len(data.train),
        "n_test": len(data.test),
        "draws": args.draws,
        "true_log_prob_1pct_quantile": threshold,
        "models": models,
        "fff_test_rows_unsolved": int((~ok).sum()),
        "fff_gap_mean": float(gap.mean()),
        "fff_gap_median": float(gap.median()),
        "fff_reconstruction_median": float(rec.median()),
        "fff_reconstruction_90pct": float(torch.quantile(rec, 0.9)),
        "fff_gap_by_reconstruction": bins,
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer_diagnose.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Where the free-form flow's draws go ({args.dataset}, seed {args.seed}, "
        f"{args.cpu_seconds:g} CPU-s per model)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{len(data.train)} train / {len(data.test)} test rows; {args.draws} draws per model. "
        "The truth puts 1 % of its mass below its own 1 % quantile of log p.",
        "",
        "| model | steps | draws below the data's 1 % log p quantile | reverse KL(q‖p) |",
        "|---|---:|---:|---:|",
    ]
    for name, m in models.items():
        lines.append(
            f"| {name} | {m['steps']} | {100 * m['fraction_below_1pct_quantile']:.2f} % | "
            f"{m['reverse_kl']:.4f} ± {m['reverse_kl_stderr']:.4f} |"
        )
    lines += [
        "",
        "Free-form flow on the test rows: paper value − normalised log-density (nats), by "
        f"reconstruction error ‖g(f(x)) − x‖ (median {result['fff_reconstruction_median']:.4f}, "
        f"90 % quantile {result['fff_reconstruction_90pct']:.4f}); {result['fff_test_rows_unsolved']} "
        "rows unsolved and left out.",
        "",
        "| ‖g(f(x)) − x‖ | rows | mean gap |",
        "|---|---:|---:|",
    ]
    for b in bins:
        gap_text = "—" if b["mean_gap"] is None else f"{b['mean_gap']:+.4f}"
        lines.append(f"| [{b['low']:g}, {b['high']:g}) | {b['rows']} | {gap_text} |")
    lines.append("")
    (args.out / "peer_diagnose.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
