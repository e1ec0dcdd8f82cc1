"""The side-by-side training loop of benchmarks/peer_baseline.py: exact budgets, same batches."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from freeflows import RealNVP  # noqa: E402
from peer_baseline import (  # noqa: E402
    Contender,
    Density,
    TrainSettings,
    evaluate_density,
    exact_flow_contender,
    one_cycle_lr,
    train_side_by_side,
)


def test_one_cycle_lr_shape():
    lr = 3e-3
    assert one_cycle_lr(0.0, lr) == pytest.approx(lr / 25)
    assert one_cycle_lr(0.3, lr) == pytest.approx(lr)
    assert one_cycle_lr(1.0, lr) == pytest.approx(lr / 25 / 1e4)
    values = [one_cycle_lr(p / 100, lr) for p in range(101)]
    assert all(a <= b for a, b in zip(values[:30], values[1:31], strict=True))
    assert all(a >= b for a, b in zip(values[30:-1], values[31:], strict=True))


class _Recorder(torch.nn.Module):
    """A Gaussian with a learnable mean that records the batches it is trained on."""

    def __init__(self):
        super().__init__()
        self.mean = torch.nn.Parameter(torch.zeros(2))
        self.seen: list[torch.Tensor] = []

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * (x - self.mean).square().sum(-1) - math.log(2 * math.pi)

    def contender(self, name: str) -> Contender:
        def loss(x: torch.Tensor) -> torch.Tensor:
            self.seen.append(x.clone())
            return -self.log_prob(x).mean()

        return Contender(name, self, loss, {"log_prob": Density(self.log_prob, True)})


def test_equal_steps_and_same_batches():
    x = torch.randn(1000, 2) + 3.0
    a, b = _Recorder(), _Recorder()
    s = TrainSettings(lr=0.1, batch_size=32, grad_clip=10.0, steps=57, budget="steps", slice_cpu_seconds=0.01)
    trainees = train_side_by_side([a.contender("a"), b.contender("b")], x, s, seed=0)
    assert [t.steps for t in trainees] == [57, 57]
    assert len(a.seen) == len(b.seen) == 57
    assert all(torch.equal(u, v) for u, v in zip(a.seen, b.seen, strict=True))
    assert torch.allclose(a.mean, b.mean)
    assert a.mean.detach().sub(3.0).abs().max() < 1.0  # it learned


def test_equal_cpu_budget_is_met_by_every_model():
    x = torch.randn(2000, 2)
    torch.manual_seed(0)
    flow = RealNVP(2)
    cheap = _Recorder()
    s = TrainSettings(
        lr=1e-3, batch_size=64, grad_clip=10.0, cpu_seconds=0.35, budget="cpu", slice_cpu_seconds=0.1
    )
    trainees = train_side_by_side(
        [exact_flow_contender("realnvp", flow), cheap.contender("cheap")], x, s, seed=1
    )
    for t in trainees:
        # the last step may overshoot; by less than one turn (0.1 s), even on a loaded machine
        assert 0.35 <= t.cpu_seconds < 0.35 + 0.1
    # the cheap model takes more steps in the same CPU time
    assert trainees[1].steps > trainees[0].steps > 0


def test_nonfinite_loss_skips_and_stops_as_diverged():
    model = _Recorder()
    bad = Contender("bad", model, lambda x: model.mean.sum() * float("nan"), {})
    s = TrainSettings(lr=0.1, batch_size=8, grad_clip=0.0, steps=100, budget="steps", max_nonfinite=5)
    (t,) = train_side_by_side([bad], torch.randn(50, 2), s, seed=0)
    assert t.diverged and t.steps == 0 and t.nonfinite_total == 5
    assert torch.equal(model.mean.detach(), torch.zeros(2))


def test_evaluate_density_counts_failed_rows_and_kl():
    x = torch.randn(400, 2)
    truth = _Recorder()

    def with_nans(rows: torch.Tensor) -> torch.Tensor:
        out = truth.log_prob(rows)
        out[::4] = float("nan")
        return out

    out = evaluate_density(Density(with_nans, True), x, truth.log_prob, chunk=64)
    assert out["n_failed"] == 100
    assert out["kl"] == pytest.approx(0.0, abs=1e-9)
    m = evaluate_density(Density(truth.log_prob, True), x, truth.log_prob, mass_data=x)
    assert m["mass"] == pytest.approx(1.0, abs=1e-3)
