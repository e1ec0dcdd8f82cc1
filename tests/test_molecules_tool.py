"""The qm9 data set of the tool, the molecule evaluation and the qm9 presets (the slow test trains
the preset on the shipped slice through the CLI and reads its metrics.json)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from freeflows.data.molecule_events import load_qm9_events
from freeflows.eval.molecule_generation import draw_counts, molecule_generation_metrics
from freeflows.experiments.config import load_config
from freeflows.experiments.registry import build_model
from freeflows.point_clouds import node_mask


def slice_data(**options):
    return load_qm9_events(200, 32, 50, seed=0, **{"source": "slice", **options})


def test_qm9_slice_events():
    data = slice_data(eval_samples=20, nll_rows=3)
    assert data.kind == "molecules" and data.event_shape == (29, 9) and data.condition_dim == 1
    assert (len(data.train), len(data.val), len(data.test)) == (200, 32, 50)
    x, c = data.train.x, data.train.c
    mask = node_mask(c, 29)
    assert bool((x[~mask] == 0).all())
    centre = (x[..., :3] * mask.unsqueeze(-1)).sum(1) / c
    assert centre.abs().max() < 1e-4
    # the atom types come back from the dequantised channels
    types = data.meta["encoding"].decode(x[..., 3:], mask)
    from freeflows.data.qm9 import qm9_slice

    assert torch.equal(types, qm9_slice("train")[:200].types)
    assert float(data.meta["count_histogram"].sum()) == pytest.approx(1.0)


def test_qm9_bad_options_are_one_line():
    with pytest.raises(ValueError, match="source must be qm9 or slice") as err:
        slice_data(source="web")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="nll_rows must be an integer >= 1"):
        slice_data(nll_rows=0)
    with pytest.raises(ValueError, match="not used by qm9"):
        slice_data(samples=3)


def test_counts_follow_the_histogram():
    hist = torch.tensor([0.0, 0.0, 0.0, 0.25, 0.75])
    counts = draw_counts(hist, 20000, torch.Generator().manual_seed(0))
    share = float((counts == 4).double().mean())
    # standard error of the share: sqrt(0.75 * 0.25 / 20000) ~ 0.003
    assert abs(share - 0.75) < 5 * (0.75 * 0.25 / 20000) ** 0.5 and set(counts.tolist()) == {3, 4}


@pytest.mark.parametrize("preset", ["qm9", "qm9-ecnf"])
def test_generation_metrics_of_an_untrained_model(preset):
    data = slice_data()
    cfg = load_config(preset)
    kind = cfg["model"]["kind"]
    options = {**cfg["model"][kind], "hidden": 8, "layers": 1}
    model = build_model({"kind": kind, kind: options}, data.event_shape, 1, data.meta)
    metrics = molecule_generation_metrics(model, data, 10, batch_size=5)
    for key in (
        "atom_stability",
        "molecule_stability",
        "validity",
        "uniqueness",
        "novelty",
        "molecules_per_second",
        "stable_molecules_per_second",
        "data_molecule_stability",
    ):
        assert key in metrics
    assert metrics["n_generated"] == 10 and metrics["data_n_molecules"] == 10
    assert metrics["molecules_per_second"] > 0
    assert metrics["data_atom_stability"] > 0.9  # QM9 itself, under the bond-length rules


@pytest.mark.slow
def test_qm9_preset_trains_on_the_slice(tmp_path):
    """The qm9 preset trains a few steps on the shipped slice through the CLI and writes EDM's
    metrics, the data row, the speed and the NLL to metrics.json, and the molecule plots."""
    out = tmp_path / "run"
    sets = [
        "data.options.source=slice",
        "data.n_train=200",
        "data.n_val=32",
        "data.n_test=60",
        "eval.samples=60",
        "data.options.nll_rows=2",
        "trainer.max_steps=10",
        "model.fff-molecules.hidden=16",
        "model.fff-molecules.layers=2",
    ]
    cmd = [sys.executable, "-m", "freeflows.cli", "train", "qm9", "--out", str(out), "--threads", "1"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, timeout=170, capture_output=True)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "test_nll",
        "test_nll_joint",
        "test_nll_types_bound",
        "nll_density",
        "atom_stability",
        "molecule_stability",
        "validity",
        "uniqueness",
        "novelty",
        "molecules_per_second",
        "stable_molecules_per_second",
        "data_atom_stability",
        "data_validity",
    ):
        assert key in metrics, key
    assert metrics["n_generated"] == 60 and metrics["steps"] == 10
    assert metrics["test_nll_unsolved"] == 0
    assert (out / "molecules.png").is_file() and (out / "molecule_histograms.png").is_file()


def test_generated_molecules_are_set_by_eval_samples(tmp_path):
    """eval.samples is the one key for the number of molecules scored; data.options.eval_samples
    is a one-line error naming it."""
    from freeflows.experiments.config import ConfigError, validate
    from freeflows.runner.train import build

    cfg = load_config(
        "qm9",
        ["data.options.source=slice", "data.n_train=50", "data.n_val=16", "data.n_test=20", "eval.samples=7"],
    )
    data, _ = build(cfg)
    assert data.meta["eval_samples"] == 7
    bad = load_config(
        "qm9",
        ["data.options.source=slice", "data.n_train=50", "data.n_val=16", "data.options.eval_samples=7"],
    )
    with pytest.raises(ValueError, match="eval.samples"):
        build(bad)
    with pytest.raises(ConfigError, match="eval.samples"):
        validate(load_config("qm9", ["eval.samples=-1"]))


def test_joint_nll_leaves_out_and_counts_unsolved_rows_and_unseen_atom_counts():
    from freeflows.data.molecule_events import load_qm9_events
    from freeflows.eval.molecule_generation import count_log_prob, molecule_nll_metrics

    data = load_qm9_events(60, 20, 100, seed=0, source="slice")
    c = data.test.c
    log_n = count_log_prob(data, c)
    unseen = ~torch.isfinite(log_n)
    assert bool(unseen.any()), "60 training molecules leave some test atom counts unseen"
    log_q = -torch.arange(len(c), dtype=torch.float64) - 50.0
    log_q[0] = float("nan")  # an unsolved row
    out = molecule_nll_metrics(log_q, data, c)
    rows = torch.isfinite(log_q) & ~unseen
    assert out["test_nll_joint_rows"] == int(rows.sum())
    assert out["test_nll_unseen_counts"] == int(unseen.sum())
    assert out["test_nll_joint"] == pytest.approx(float(-(log_q + log_n)[rows].mean()))
    boxes = data.meta["encoding"].log_volume(c[:, -1].double())[rows].mean()
    assert out["test_nll_types_bound"] == pytest.approx(out["test_nll_joint"] - float(boxes))
    assert math.isfinite(out["test_nll_types_bound"])
