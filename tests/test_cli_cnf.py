"""The CNF through the tool: CLI end to end, NFE parts in metrics.csv, the CNF presets."""

import csv
import json

import pytest

from freeflows.cli import main
from freeflows.experiments.config import list_presets, load_config

SMALL_CNF = [
    "--set", "model.kind=cnf",
    "--set", "model.cnf.hidden=16",
    "--set", "model.cnf.layers=1",
    "--set", "model.cnf.trace=hutchinson",
    "--set", "model.cnf.rtol=1e-3",
    "--set", "model.cnf.atol=1e-3",
    "--set", "model.cnf.train_rtol=1e-2",
    "--set", "model.cnf.train_atol=1e-2",
    "--set", "data.n_train=1024",
    "--set", "data.n_test=256",
    "--set", "trainer.max_steps=12",
    "--set", "trainer.batch_size=128",
    "--set", "trainer.val_every_epochs=1",
    "--set", "trainer.progress_bar=false",
    "--set", "trainer.threads=1",
]  # fmt: skip


def _metric_rows(path):
    with open(path) as fh:
        return [(int(step), name, float(value)) for step, name, value in csv.reader(fh) if step != "step"]


def test_cnf_trains_through_the_cli_and_logs_nfe(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(run), *SMALL_CNF, "--set", "trainer.plot=false"]) == 0
    rows = _metric_rows(run / "metrics.csv")
    names = {name for _, name, _ in rows}
    for key in ("train/nll", "train/nfe_forward", "train/nfe_backward", "train/kinetic", "val/nll"):
        assert key in names, sorted(names)
    nfe = [v for _, name, v in rows if name == "train/nfe_forward"]
    assert all(v >= 6 for v in nfe)  # dopri5 takes >= 1 step of 6 evaluations
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 12
    assert metrics["n_test"] == 256 and metrics["test_nll"] == pytest.approx(metrics["test_nll"])
    assert 0.5 < metrics["test_nll"] < 5.0


def test_failing_solves_skip_batches_then_stop_with_a_hint(tmp_path, capsys):
    """Every training solve fails (max_num_steps=1): each batch is skipped, and after
    trainer.max_nonfinite of them the run stops with one message and the CNF's advice."""
    run = tmp_path / "run"
    args = ["train", "tiny", "--out", str(run), *SMALL_CNF, "--set", "model.cnf.max_num_steps=1"]
    code = main([*args, "--set", "trainer.max_nonfinite=3"])
    err = capsys.readouterr().err
    assert code == 1
    assert "training diverged: 3 batches in a row" in err and "solver=rk4" in err
    assert "--set model.cnf.<option>" in err
    assert "Traceback" not in err


def test_cnf_presets_load_with_their_options():
    presets = list_presets()
    for name in ("cnf-two-moons", "cnf-eight-gaussians", "rnode-two-moons"):
        assert presets[name], f"{name} has no description"
        cfg = load_config(name)
        cnf = cfg["model"]["cnf"]
        assert cfg["model"]["kind"] == "cnf" and cnf["trace"] == "hutchinson"
        assert cnf["rtol"] == cnf["atol"] == 1e-5 and cnf["train_rtol"] == 1e-3
    rnode = load_config("rnode-two-moons")["model"]["cnf"]
    assert rnode["kinetic"] > 0 and rnode["jacobian"] > 0


def test_scientific_overrides_without_a_dot_are_numbers():
    cfg = load_config("tiny", ["model.kind=cnf", "model.cnf.train_rtol=1e-3", "optim.lr=2e-3"])
    assert cfg["model"]["cnf"]["train_rtol"] == 1e-3 and cfg["optim"]["lr"] == 2e-3


@pytest.mark.slow
def test_cnf_cli_with_plots_and_sampling(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(run), *SMALL_CNF]) == 0
    for name in ("density.png", "samples.png", "curves.png"):
        assert (run / name).is_file()
    out = tmp_path / "s.npy"
    assert main(["sample", str(run), "-n", "50", "-o", str(out)]) == 0
    assert out.is_file()
