"""C2ST of posterior estimates on sbibm tasks: a conditional free-form flow against NPE (NSF).

For each task and simulation budget, both methods train on the same simulations (the train and
validation splits of :func:`freeflows.data.sbi.load_sbi_task`, seed ``--seed``):

* ``fff``: a :class:`freeflows.FreeFormFlow` with conditional :class:`freeflows.ResNet` encoder and
  decoder, trained on standardised :math:`(\\theta, x)` by a plain Adam loop that keeps the weights
  of the best exact validation NLL (stopping after ``--patience`` epochs without a better one);
  posterior draws are un-standardised before scoring;
* ``npe-nsf``: NPE with sbi's neural spline flow (:mod:`freeflows.sbi_baseline`).

Then, for each reference observation, ``--num-samples`` posterior draws are compared with
sbibm's reference posterior samples by C2ST (sbibm protocol; ``--c2st sklearn`` is sbibm's
classifier, ``--c2st torch`` the faster one). The score is 0.5 for a perfect posterior and 1 for
a useless one. Results go to ``benchmarks/results/<name>.json`` and ``.md``.

    python benchmarks/sbi_c2st.py --tasks two_moons --budgets 1000 --methods fff npe-nsf
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from freeflows import FreeFormFlow, ResNet, StandardNormal
from freeflows.c2st import c2st
from freeflows.data.base import DataSet
from freeflows.data.sbi import NUM_OBSERVATIONS, load_sbi_task, observation, reference_posterior

RESULTS = Path(__file__).parent / "results"


def train_fff(data: DataSet, args: argparse.Namespace) -> tuple[FreeFormFlow, dict[str, float]]:
    """Adam on the free-form loss, keeping the weights of the best exact validation NLL."""
    torch.manual_seed(args.seed)
    dim, cdim = data.event_shape[0], data.condition_dim
    assert cdim is not None

    def net() -> ResNet:
        return ResNet(dim, hidden=args.hidden, depth=2, blocks=args.blocks, condition_features=cdim)

    model = FreeFormFlow(net(), net(), StandardNormal(dim), beta=args.beta, condition_dim=cdim)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train, val = data.train, data.val
    generator = torch.Generator().manual_seed(args.seed)
    best, best_state, bad, epoch = float("inf"), copy.deepcopy(model.state_dict()), 0, 0
    for epoch in range(1, args.epochs + 1):  # noqa: B007 (reported after the loop)
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), args.batch_size):
            idx = order[start : start + args.batch_size]
            optimizer.zero_grad()
            model.loss(train.x[idx], train.c[idx]).value.backward()
            optimizer.step()
        with torch.no_grad():
            value = -model.log_prob(val.x, val.c).mean().item()  # exact NLL of the validation split
        if value < best:
            best, best_state, bad = value, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= args.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, {"epochs": epoch, "best_val_nll": round(best, 4)}


def fff_sampler(model: FreeFormFlow, data: DataSet):
    theta_std, x_std = data.meta["theta_standardizer"], data.meta["x_standardizer"]

    def sample(n: int, x_o: torch.Tensor, seed: int) -> torch.Tensor:
        c = x_std(x_o.reshape(1, -1)).reshape(-1)
        with torch.no_grad():
            draws = model.sample(n, c, generator=torch.Generator().manual_seed(seed))
        return theta_std.inverse(draws)

    return sample


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for task in args.tasks:
        for budget in args.budgets:
            data = load_sbi_task(task, budget, seed=args.seed)
            for method in args.methods:
                start = time.perf_counter()
                if method == "fff":
                    model, info = train_fff(data, args)
                    sample = fff_sampler(model, data)
                elif method == "npe-nsf":
                    from freeflows.sbi_baseline import train_npe_on_dataset

                    posterior = train_npe_on_dataset(data, training_batch_size=args.npe_batch_size)
                    info = {"epochs": posterior.epochs}
                    sample = posterior.sample
                else:
                    raise ValueError(f"unknown method {method!r}; choose fff or npe-nsf")
                train_seconds = time.perf_counter() - start
                for num in args.observations:
                    reference = reference_posterior(task, num)[: args.num_samples]
                    draws = sample(args.num_samples, observation(task, num), args.seed + num)
                    start = time.perf_counter()
                    score = c2st(reference, draws, classifier=args.c2st)
                    row = {
                        "task": task,
                        "budget": budget,
                        "method": method,
                        "seed": args.seed,
                        "observation": num,
                        "c2st": round(score, 4),
                        "num_samples": args.num_samples,
                        "c2st_classifier": args.c2st,
                        "train_seconds": round(train_seconds, 1),
                        "c2st_seconds": round(time.perf_counter() - start, 1),
                        **info,
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# C2ST on sbibm tasks (0.5 is best)",
        "",
        f"seed {args.seed}; {args.num_samples} posterior draws against {args.num_samples} reference "
        f"samples per observation; C2ST classifier: {args.c2st}; fff: ResNet hidden {args.hidden}, "
        f"blocks {args.blocks}, beta {args.beta}, lr {args.lr}, batch {args.batch_size}; "
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads.",
        "",
        "| task | budget | method | mean C2ST | per observation | train s |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["budget"], row["method"]), []).append(row)
    for (task, budget, method), group in groups.items():
        scores = [r["c2st"] for r in group]
        per = ", ".join(f"{r['observation']}: {r['c2st']:.3f}" for r in group)
        mean = sum(scores) / len(scores)
        lines.append(f"| {task} | {budget} | {method} | {mean:.3f} | {per} | {group[0]['train_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[1000])
    parser.add_argument("--methods", nargs="+", default=["fff", "npe-nsf"])
    parser.add_argument("--observations", nargs="+", type=int, default=list(range(1, NUM_OBSERVATIONS + 1)))
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--c2st", choices=["sklearn", "torch"], default="sklearn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--patience", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=10.0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--npe-batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="sbi_c2st")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
