"""Adaptive beta: the dual-ascent step moves beta towards holding the metric at its target."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import freeflows as ff
from freeflows.runner.beta import AdaptiveBeta


def test_the_step_raises_beta_above_the_target_and_lowers_it_below():
    cb = AdaptiveBeta(target=0.01, rate=0.5, beta_min=1.0, beta_max=1000.0, max_factor=1e9)
    assert cb.step(10.0, 0.04) == pytest.approx(20.0)  # 10 * (0.04 / 0.01) ** 0.5
    assert cb.step(10.0, 0.0025) == pytest.approx(5.0)
    assert cb.step(10.0, 0.01) == pytest.approx(10.0)
    assert cb.step(10.0, 1e6) == 1000.0 and cb.step(10.0, 1e-12) == 1.0  # clipped to the limits
    capped = AdaptiveBeta(target=0.01, rate=0.5, max_factor=3.0)
    assert capped.step(10.0, 1e6) == pytest.approx(30.0) and capped.step(10.0, 1e-12) == pytest.approx(10 / 3)
    assert capped.step(10.0, 0.04) == pytest.approx(20.0)  # within the cap: unchanged
    assert cb.step(10.0, float("nan")) == 10.0 and cb.step(10.0, 0.0) == 10.0


def test_a_metric_that_falls_with_beta_settles_at_the_target():
    cb = AdaptiveBeta(target=1e-3, rate=0.5)
    # a constructed model whose defect falls as 1 / beta^2: the fixed point is beta = sqrt(1 / 1e-3)
    beta = 1.0
    for _ in range(60):
        beta = cb.step(beta, 1.0 / beta**2)
    assert beta == pytest.approx(math.sqrt(1e3), rel=1e-6)


def _fake(metrics: dict, beta: float = 10.0):
    model = SimpleNamespace(beta=beta)
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics=metrics, global_step=7)
    return trainer, SimpleNamespace(model=model), model


def test_the_callback_updates_the_models_beta_and_keeps_its_history():
    cb = AdaptiveBeta(target=0.01, rate=1.0, max_factor=100.0)
    trainer, module, model = _fake({"val/inverse_defect_per_dim": torch.tensor(0.1)})
    cb.on_validation_end(trainer, module)
    assert model.beta == pytest.approx(100.0) and cb.history == [(7, pytest.approx(100.0))]
    state = cb.state_dict()
    fresh = AdaptiveBeta(target=0.01)
    fresh.load_state_dict(state)
    _, module2, model2 = _fake({}, beta=10.0)
    fresh.on_train_start(trainer, module2)
    assert model2.beta == pytest.approx(100.0), "a resumed run continues from the saved beta"


def test_clear_errors():
    with pytest.raises(ValueError, match="target must be a finite number > 0"):
        AdaptiveBeta(target=0.0)
    with pytest.raises(ValueError, match="max_factor must be > 1"):
        AdaptiveBeta(target=1.0, max_factor=1.0)
    with pytest.raises(ValueError, match="beta_min 10 exceeds beta_max 1"):
        AdaptiveBeta(target=1.0, beta_min=10.0, beta_max=1.0)
    cb = AdaptiveBeta(target=0.01)
    trainer, module, _ = _fake({"val/nll": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="follows 'val/inverse_defect_per_dim', which this model does not"):
        cb.on_validation_end(trainer, module)
    with pytest.raises(ValueError, match="needs a model with a float attribute beta"):
        cb.on_train_start(trainer, SimpleNamespace(model=ff.StandardNormal(2)))


@pytest.mark.parametrize("target,direction", [(1e-8, 1), (1.0, -1)])
def test_a_tiny_run_moves_beta_the_right_way_and_logs_it(tmp_path, target, direction):
    from freeflows.experiments.config import load_config
    from freeflows.runner.train import train

    cfg = load_config(
        "tiny",
        [
            "trainer.progress_bar=false",
            "trainer.plot=false",
            "trainer.max_steps=16",
            "trainer.val_every_epochs=1",
        ],
    )
    cb = AdaptiveBeta(target=target, rate=0.1)
    run = train(cfg, tmp_path / "r", callbacks=[cb])
    assert len(cb.history) == 2  # validations at steps 8 and 16
    betas = [b for _, b in cb.history]
    start = cfg["model"]["fff"]["beta"]
    assert (betas[0] - start) * direction > 0 and (betas[1] - betas[0]) * direction > 0
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    logged = [float(r[2]) for r in rows if r[1] == "beta"]
    assert logged and logged[-1] == pytest.approx(betas[0])  # the last training step ran with it
    # last.ckpt (written at the last step, before the last validation) holds the beta of that step
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["AdaptiveBeta"]
    assert saved["history"] and [tuple(h) for h in saved["history"]] == cb.history[: len(saved["history"])]
    assert saved["beta"] == saved["history"][-1][1]


def test_beta_auto_in_the_config_adapts_beta_from_its_start(tmp_path):
    from freeflows.experiments.config import load_config
    from freeflows.runner.train import train

    overrides = [
        "trainer.progress_bar=false",
        "trainer.plot=false",
        "trainer.max_steps=16",
        "trainer.val_every_epochs=1",
        "model.fff.beta=auto",
        "beta_auto.start=20",
        "beta_auto.target=1e-8",  # far below what 8 steps reach: beta must rise
        "beta_auto.rate=0.1",
    ]
    run = train(load_config("tiny", overrides), tmp_path / "r")
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    betas = [float(r[2]) for r in rows if r[1] == "beta"]
    assert betas[0] == pytest.approx(20.0) and betas[-1] > 20.0
    assert "beta: auto" in (run / "config.yaml").read_text()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.fff.beta=fast"], "model.fff.beta must be a number"),
        (["model.fff.beta=auto", "beta_auto.target=-1"], "adaptive beta: target must be a finite number > 0"),
        (["model.fff.beta=auto", "beta_auto.min=10", "beta_auto.max=1"], "beta_min 10 exceeds beta_max 1"),
    ],
)
def test_bad_beta_auto_settings_are_one_line(capsys, tmp_path, overrides, needle):
    from freeflows.cli import main

    args = ["train", "tiny", "--out", str(tmp_path / "r")]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "r").exists()
