"""Best KL(p || q) a free-form flow reaches on the two data sets with a known density.

Trains the shipped presets ``gaussian-mixture-1d`` and ``eight-gaussians`` through the runner
with a longer budget and reports KL to the truth, E_p[log p - log q] on the 5000-point test split
with the exact (decoder-based) log_prob, with its standard error.

    python benchmarks/fff_kl.py --steps 10000 --seeds 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from freeflows.experiments.config import load_config
from freeflows.runner.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["gaussian-mixture-1d", "eight-gaussians"])
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--runs", default="runs/bench-fff-kl")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.presets:
        for seed in args.seeds:
            cfg = load_config(
                preset,
                [
                    f"trainer.max_steps={args.steps}",
                    f"seed={seed}",
                    "trainer.threads=1",
                    "trainer.plot=false",
                ],
            )
            run = train(cfg, Path(args.runs) / f"{preset}-s{seed}-{args.steps}")
            m = json.loads((run / "metrics.json").read_text())
            rows.append(
                {
                    "preset": preset,
                    "seed": seed,
                    "steps": args.steps,
                    "kl": m["kl_to_truth"],
                    "kl_stderr": m["kl_to_truth_stderr"],
                    "test_nll": m["test_nll"],
                    "train_seconds": m["train_seconds"],
                }
            )
            print(rows[-1], flush=True)
    (out / "fff_kl.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| preset | seed | steps | KL(p‖q) [nats] | test NLL | train time [s] |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['seed']} | {r['steps']} | {r['kl']:.4f} ± {r['kl_stderr']:.4f} "
            f"| {r['test_nll']:.3f} | {r['train_seconds']:.0f} |"
        )
    (out / "fff_kl.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
