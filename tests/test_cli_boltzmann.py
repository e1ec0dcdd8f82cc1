"""Boltzmann generators through the tool: the fff-egnn and ecnf kinds train on DW4 from the CLI,
and the particle metrics (ESS, energies) and histograms are written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from freeflows.cli import main
from freeflows.data.base import DataSet, Split
from freeflows.eval.metrics import particle_metrics
from freeflows.experiments.config import ConfigError, load_config
from freeflows.experiments.registry import build_model, model_defaults

FAST = ["--set", "trainer.progress_bar=false", "--set", "trainer.threads=1", "--set", "trainer.max_steps=5"]
FAST += ["--set", "trainer.batch_size=64", "--set", "data.n_train=512"]


def _check_run(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["ess"] <= 1.0
    assert metrics["nll_dims"] == 6  # (N - 1) * d for DW4
    assert math.isfinite(metrics["test_nll"]) and metrics["n_test"] == 5000
    assert math.isfinite(metrics["data_energy_mean"]) and metrics["ess_samples"] == 2000
    for name in ("energy.png", "distances.png"):
        assert (run / name).is_file(), name
    assert not (run / "density.png").exists()
    return metrics


def test_fff_egnn_dw4_cli(tmp_path):
    run = tmp_path / "fff"
    tiny = ["--set", "model.fff-egnn.hidden=8", "--set", "model.fff-egnn.layers=1"]
    assert main(["train", "dw4", "--out", str(run), *FAST, *tiny]) == 0
    metrics = _check_run(run)
    assert "test_log_prob_gap" in metrics


def test_ecnf_dw4_cli(tmp_path):
    run = tmp_path / "ecnf"
    tiny = ["--set", "model.ecnf.hidden=8", "--set", "model.ecnf.layers=1"]
    tiny += ["--set", "model.ecnf.solver=rk4", "--set", "model.ecnf.step_size=0.5"]
    assert main(["train", "dw4-ecnf", "--out", str(run), *FAST, *tiny]) == 0
    _check_run(run)


def test_particle_presets_and_options():
    defaults = model_defaults()
    assert {"hidden", "layers", "attention", "beta"} <= set(defaults["fff-egnn"])
    assert {"trace", "solver", "rtol", "train_rtol", "kinetic", "jacobian"} <= set(defaults["ecnf"])
    for preset, kind in (
        ("dw4", "fff-egnn"),
        ("lj13", "fff-egnn"),
        ("dw4-ecnf", "ecnf"),
        ("lj13-ecnf", "ecnf"),
    ):
        cfg = load_config(preset)
        assert cfg["model"]["kind"] == kind and cfg["trainer"]["threads"] == 1 and cfg["description"]
    cfg = load_config("dw4", ["model.fff-egnn.hidden=16"])
    assert cfg["model"]["fff-egnn"]["hidden"] == 16
    with pytest.raises(ConfigError, match="model.fff-egnn.width"):
        load_config("dw4", ["model.fff-egnn.width=16"])
    meta = {"n_particles": 4, "n_dims": 2}
    with pytest.raises(ValueError, match="valid options: hidden"):
        build_model({"kind": "ecnf", "ecnf": {"width": 3}}, (8,), None, meta=meta)
    with pytest.raises(ValueError, match="needs a particle data set"):
        build_model({"kind": "fff-egnn", "fff-egnn": {}}, (8,), None)
    # existing kinds still build without meta
    assert build_model({"kind": "fff", "fff": {"hidden": 8}}, (2,), None) is not None


class _Exploding(torch.nn.Module):
    """A stand-in model whose samples include a NaN row and two overlapping particles."""

    def sample(self, n, c=None):
        x = torch.randn(n, 8)
        x[0] = float("nan")
        x[1, :2] = x[1, 2:4]  # particles 1 and 2 coincide: infinite LJ-like energy
        return x

    def log_prob(self, x, c=None):
        return -0.5 * x.square().sum(dim=1)

    def sample_and_log_prob(self, n, c=None):
        x = self.sample(n, c)
        return x, self.log_prob(x)


def test_ess_survives_nonfinite_energies():
    def energy(x):
        p = x.reshape(-1, 4, 2)
        d = (p[:, :, None] - p[:, None]).norm(dim=-1) + torch.eye(4)
        return (1.0 / d.pow(12)).sum(dim=(1, 2)) - 4.0

    test = Split(torch.randn(10, 8))
    data = DataSet("toy", test, test, test, (8,), kind="particles", meta={"energy": energy})
    out = particle_metrics(_Exploding(), data, n_samples=50, batch_size=50)
    assert out["ess_dropped"] == 1 and out["sample_energy_nonfinite"] >= 2
    assert 0.0 < out["ess"] <= 1.0


@pytest.mark.parametrize(
    "kind, shape, meta", [("fff", (2,), None), ("fff-egnn", (8,), {"n_particles": 4, "n_dims": 2})]
)
def test_surrogate_mode_is_a_model_option(kind, shape, meta):
    assert model_defaults()[kind]["surrogate"] == "vjp"
    model = build_model({"kind": kind, kind: {"surrogate": "jvp"}}, shape, None, meta=meta)
    assert model.surrogate == "jvp"
    with pytest.raises(ValueError, match="surrogate"):
        build_model({"kind": kind, kind: {"surrogate": "forward"}}, shape, None, meta=meta)
