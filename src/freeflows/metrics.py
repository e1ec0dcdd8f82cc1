"""Test metrics of a trained model on a data set (tool layer; torch only)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .data.base import DataSet, Split


def batched_log_prob(model: nn.Module, split: Split, batch_size: int = 1000) -> torch.Tensor:
    """Exact ``log_prob`` of every row of a split, in batches."""
    out = []
    for i in range(0, len(split), batch_size):
        x = split.x[i : i + batch_size]
        c = None if split.c is None else split.c[i : i + batch_size]
        out.append(model.log_prob(x, c).detach())
    return torch.cat(out)


def sampling_seconds_per_sample(
    model: nn.Module, n: int, c: torch.Tensor | None = None, repeats: int = 3
) -> float:
    """Median wall time of ``model.sample(n)`` divided by ``n``."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model.sample(n, c)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] / n


def evaluate_model(model: nn.Module, data: DataSet, batch_size: int = 1000) -> dict[str, Any]:
    """Test NLL (exact), diagnostics, KL to the truth when the density is known, parameter count
    and sampling time."""
    model.eval()
    test = data.test
    log_q = batched_log_prob(model, test, batch_size)
    metrics: dict[str, Any] = {
        "test_nll": float(-log_q.mean()),
        "test_nll_stderr": float(log_q.std() / len(log_q) ** 0.5),
        "n_test": len(test),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    if hasattr(model, "diagnostics"):
        sums: dict[str, float] = {}
        for i in range(0, len(test), batch_size):
            x = test.x[i : i + batch_size]
            c = None if test.c is None else test.c[i : i + batch_size]
            for key, value in model.diagnostics(x, c, log_prob=log_q[i : i + batch_size]).items():
                sums[key] = sums.get(key, 0.0) + float(value) * x.shape[0]
        metrics.update({f"test_{k}": v / len(test) for k, v in sums.items()})
    if data.true_log_prob is not None:
        log_p = data.true_log_prob(test.x, test.c).double()
        diff = log_p - log_q.double()
        metrics["kl_to_truth"] = float(diff.mean())
        metrics["kl_to_truth_stderr"] = float(diff.std() / len(diff) ** 0.5)
        metrics["true_test_nll"] = float(-log_p.mean())
    c0 = None if test.c is None else test.c[0]
    metrics["sample_seconds_per_sample"] = sampling_seconds_per_sample(model, 2000, c0)
    return metrics
