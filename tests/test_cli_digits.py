"""`freeflows train digits` end to end, tiny: a convolutional free-form flow on scikit-learn's
8×8 digits writes test bits/dim of its normalised density, the papers' value beside it, and a
sample grid, and its run loads back and samples images."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = pytest.mark.slow


def test_digits_trains_end_to_end(tmp_path):
    from freeflows.experiments.config import load_config
    from freeflows.runner.train import load_run, train

    tiny = ["trainer.max_steps=10", "model.fff-conv.hidden=8", "trainer.progress_bar=false"]
    cfg = load_config("digits", [*tiny, "trainer.threads=1"])
    run = train(cfg, tmp_path / "digits")
    metrics = json.loads((run / "metrics.json").read_text())
    bits = metrics["test_bits_per_dim"]
    # log2(17) = 4.09 bits/dim is the uniform distribution over the 17 grey levels
    assert math.isfinite(bits) and 0 < bits < 2 * math.log2(17)
    assert metrics["test_nll_unsolved"] == 0 and metrics["n_test"] > 0
    assert math.isfinite(metrics["test_bits_per_dim_paper"])
    assert (run / "samples.png").stat().st_size > 0
    _, data, model = load_run(run)
    with torch.no_grad():
        x = model.sample(3)
    assert x.shape == (3, *data.event_shape) and bool(torch.isfinite(x).all())
