"""Every classic flow trains through the CLI (``--set model.kind=<kind>``), and a bad option of a
classic model is one clear error line."""

import json

import numpy as np
import pytest

from freeflows.cli import main

CLASSIC = ("planar", "nice", "realnvp", "glow", "maf", "iaf")
FAST = [
    "--set",
    "trainer.max_steps=10",
    "--set",
    "trainer.progress_bar=false",
    "--set",
    "trainer.plot=false",
    "--set",
    "trainer.threads=1",
    "--set",
    "data.n_train=512",
    "--set",
    "data.n_test=256",
]


@pytest.mark.parametrize("kind", CLASSIC)
def test_classic_kind_trains_through_the_cli(capsys, tmp_path, kind):
    run = tmp_path / kind
    code = main(["train", "tiny", "--set", f"model.kind={kind}", "--out", str(run), *FAST])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["test_nll"])
    assert metrics["steps"] == 10
    assert metrics["n_params"] > 0
    assert (run / "config.yaml").read_text().count(f"kind: {kind}") == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", CLASSIC)
def test_classic_kind_on_eight_gaussians_evaluates_and_samples(capsys, tmp_path, kind):
    run = tmp_path / kind
    args = ["train", "eight-gaussians", "--set", f"model.kind={kind}", "--out", str(run), *FAST]
    assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["kl_to_truth"])
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-plots"]) == 0
    assert json.loads(capsys.readouterr().out)["test_nll"] == pytest.approx(metrics["test_nll"], abs=1e-4)
    out = tmp_path / "s.npy"
    assert main(["sample", str(run), "-n", "50", "-o", str(out)]) == 0
    samples = np.load(out)
    assert samples.shape == (50, 2) and np.isfinite(samples).all()


def test_unknown_option_of_a_classic_model_is_one_line(capsys, tmp_path):
    code = main(["train", "tiny", "--set", "model.realnvp.bogus=1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("freeflows: error:"), err
    assert "model.realnvp.bogus" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "r").exists()
