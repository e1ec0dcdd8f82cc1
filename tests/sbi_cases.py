"""Shared cases of the SBI tests: C2ST sample sets, and a tiny end-to-end ``freeflows sbi`` run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def two_moons_pairs(n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Reference posterior of two_moons (observation 1) against: another part of itself; itself
    blurred by 0.3 standard deviations; the Gaussian with its mean and covariance."""
    from freeflows.data.sbi import reference_posterior

    reference = reference_posterior("two_moons", 1)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(reference.shape[0], generator=g)
    a, b = reference[perm[:n]], reference[perm[n : 2 * n]]
    blurred = b + 0.3 * reference.std(0) * torch.randn(b.shape, generator=g)
    gaussian = torch.distributions.MultivariateNormal(reference.mean(0), torch.cov(reference.T))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        moment_matched = gaussian.sample((n,))
    return {"same": (a, b), "blurred": (a, blurred), "gaussian": (a, moment_matched)}


def tiny_fff_sbi_run(task: str, out: Path, *overrides: str) -> tuple[int, dict[str, Any]]:
    """``freeflows sbi`` on ``task`` with 300 simulations, 20 training steps and 300 draws for
    observation 1, plus ``--set`` ``overrides`` (or flags such as ``--reuse``); returns the exit
    code and the written ``sbi_c2st.json``."""
    from freeflows.cli import main

    args = ["sbi", "--task", task, "--budget", "300", "--observations", "1", "--num-samples", "300"]
    args += ["--set", "trainer.max_steps=20", "--set", "trainer.plot=false", "--out", str(out)]
    for override in overrides:
        args += [override] if override.startswith("--") else ["--set", override]
    code = main(args)
    return code, json.loads((out / "sbi_c2st.json").read_text()) if code == 0 else {}
