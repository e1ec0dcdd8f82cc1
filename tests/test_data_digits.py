"""The 8x8 digits data set: split, dequantisation, pre-transform, bits/dim, and a tiny run."""

import math

import pytest
import torch

import freeflows as ff
from freeflows.data.digits import (
    LEVELS,
    N_TEST,
    N_TRAIN,
    N_VAL,
    DequantizedImageModel,
    ImagePreprocess,
    _split_indices,
    dequantize,
    digit_values,
    load_digits,
    requantize,
)
from freeflows.eval.bits import bits_metrics, bits_per_dim


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_shapes_sizes_and_kind(digits):
    assert digits.event_shape == (1, 8, 8)
    assert digits.kind == "image"
    sizes = (len(digits.train), len(digits.val), len(digits.test))
    assert sizes == (N_TRAIN, N_VAL, N_TEST) == (1257, 180, 360)
    for split in (digits.train, digits.val, digits.test):
        assert split.x.shape[1:] == (1, 8, 8)
        assert split.x.dtype == torch.float32
        assert split.c is None
    assert digits.meta["levels"] == 17 and digits.meta["bits_per_dim_dim"] == 64


def test_dequantised_values_lie_in_their_grey_level(digits):
    values = digit_values()
    assert values.shape == (1797, 1, 8, 8)
    assert bool((values == values.round()).all()) and float(values.min()) == 0 and float(values.max()) == 16
    train, val, test = _split_indices(0)
    for split, idx in ((digits.train, train), (digits.val, val), (digits.test, test)):
        x = split.x
        assert float(x.min()) >= 0 and float(x.max()) < 1
        assert torch.equal(requantize(x), values[idx])  # x = (v + u)/17 with u in [0, 1)
    # the noise is spread over the bin, not at one point: u is uniform, mean 1/2, variance 1/12
    u = (digits.test.x * LEVELS - values[test]).flatten().double()
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 4 * math.sqrt(1 / 180 / n)  # Var of (u - 1/2)^2 is 1/180


def test_split_is_deterministic_disjoint_and_complete():
    a, b = load_digits(split_seed=3), load_digits(split_seed=3)
    for s, t in zip((a.train, a.val, a.test), (b.train, b.val, b.test), strict=True):
        assert torch.equal(s.x, t.x)
    other = load_digits(split_seed=4)
    assert not torch.equal(a.test.x, other.test.x)
    idx = torch.cat(_split_indices(3))
    assert torch.equal(idx.sort().values, torch.arange(1797))


def test_n_train_takes_the_first_training_images(digits):
    small = load_digits(100)
    assert len(small.train) == 100
    assert torch.equal(small.train.x, digits.train.x[:100])
    assert torch.equal(small.test.x, digits.test.x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_train": 5000}, "n_train must be between 1 and 1257"),
        ({"n_train": 0}, "n_train must be between 1 and 1257"),
        ({"preprocess": "sigmoid"}, "unknown preprocess 'sigmoid'"),
        ({"split_seed": 1.5}, "split_seed must be an integer"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_digits(**kwargs)


def test_dequantize_and_requantize():
    v = torch.tensor([0.0, 3.0, 16.0]).repeat(1000)
    x = dequantize(v, torch.Generator().manual_seed(0))
    assert torch.equal(requantize(x), v)
    assert bool(((x * 17 - v) >= 0).all()) and bool(((x * 17 - v) < 1).all())


def test_bits_per_dim_against_a_hand_computation():
    # (NLL + D ln L) / (D ln 2) with NLL = -100 nats, D = 64, L = 17:
    # 64 ln 17 = 181.325654..., 64 ln 2 = 44.361419..., (181.325654 - 100) / 44.361419 = 1.833252
    assert bits_per_dim(-100.0, 64, 17) == pytest.approx(1.833252, abs=1e-6)
    assert bits_per_dim(0.0, 64, 17) == pytest.approx(math.log2(17))
    # a model putting all its mass uniformly in the right bins is log2(17) bits/dim cheaper than uniform
    assert bits_per_dim(-64 * math.log(17), 64, 17) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="dim >= 1 and levels >= 2"):
        bits_per_dim(0.0, 0, 17)
    out = bits_metrics(
        {"test_nll": -100.0, "test_nll_stderr": 0.5, "test_nll_paper": -110.0}, {"levels": 17}, 64
    )
    assert out["test_bits_per_dim"] == pytest.approx(1.833252, abs=1e-6)
    assert out["test_bits_per_dim_stderr"] == pytest.approx(0.5 / (64 * math.log(2)))
    assert out["test_bits_per_dim_paper"] == pytest.approx(bits_per_dim(-110.0, 64, 17))


@pytest.mark.parametrize("kind", ["logit", "affine"])
def test_preprocess_log_det_matches_the_jacobian(kind, digits):
    t = ImagePreprocess.fit(digits.train.x.double(), kind)
    t = t.double()
    x = digits.test.x[:3].double()
    y, log_det = t(x)
    jac = torch.func.vmap(torch.func.jacrev(lambda r: t(r[None])[0][0]))(x)
    expected = torch.linalg.slogdet(jac.reshape(3, 64, 64)).logabsdet
    torch.testing.assert_close(log_det, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(t.inverse(y), x, atol=1e-9, rtol=0)
    # the fitted z-score: zero mean and unit variance per pixel on the training split
    y_train, _ = t(digits.train.x.double())
    assert float(y_train.mean(0).abs().max()) < 1e-9
    assert float((y_train.std(0) - 1).abs().max()) < 1e-6


def test_wrapped_density_is_the_change_of_variables(digits):
    torch.manual_seed(0)
    inner = ff.Glow((1, 8, 8), steps=1, levels=2, hidden=8)
    model = digits.wrap_model(inner)
    assert isinstance(model, DequantizedImageModel)
    x = digits.test.x[:5]
    y, log_det = model.preprocess(x)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), inner.log_prob(y) + log_det)
        draws, log_q = model.sample_and_log_prob(6)
        torch.testing.assert_close(log_q, model.log_prob(draws), atol=1e-3, rtol=1e-5)
        # outside the logit's box the density is zero, never NaN
        assert bool(torch.isneginf(model.log_prob(torch.full((2, 1, 8, 8), 1.2))).all())
    assert draws.shape == (6, 1, 8, 8)


def test_training_loss_redraws_the_dequantisation_noise(digits):
    torch.manual_seed(0)
    model = digits.wrap_model(ff.Glow((1, 8, 8), steps=1, levels=2, hidden=8))
    x = digits.train.x[:32]
    model.loss(x)  # initialises ActNorm
    model.eval()
    assert torch.equal(model.loss(x).value, model.loss(x).value)  # fixed draw: deterministic
    model.train()
    assert not torch.equal(model.loss(x).value, model.loss(x).value)
    redrawn = model.redraw(x)
    assert torch.equal(requantize(redrawn), requantize(x)) and not torch.equal(redrawn, x)


def test_free_form_flow_hooks_pass_through(digits):
    from freeflows.nets import ConvResNet

    flow = ff.FreeFormFlow(ConvResNet(1, 8, 1), ConvResNet(1, 8, 1), ff.StandardNormal(1, 8, 8))
    model = digits.wrap_model(flow)
    x = digits.test.x[:4]
    assert hasattr(model, "inverse_defect") and hasattr(model, "rsample")
    assert not hasattr(digits.wrap_model(ff.Glow((1, 8, 8), steps=1, levels=2, hidden=8)), "inverse_defect")
    with torch.no_grad():
        assert float(model.inverse_defect(x, probes=2).abs().max()) == 0.0  # identities at init
        diag = model.diagnostics(x)
        paper = model.log_prob(x, variant="paper")
    assert float(diag["reconstruction"]) == 0.0
    torch.testing.assert_close(paper, model.log_prob(x), atol=1e-4, rtol=0)
    assert model.latent.dim == 64


def test_metrics_write_bits_per_dim_for_images(digits):
    from freeflows.eval.metrics import evaluate_model

    torch.manual_seed(0)
    model = digits.wrap_model(ff.Glow((1, 8, 8), steps=1, levels=2, hidden=8))
    with torch.no_grad():
        model.loss(digits.train.x[:256])  # initialises ActNorm
    metrics = evaluate_model(model, digits, test_rows=40, mass_samples=0)
    assert metrics["test_bits_per_dim"] == pytest.approx(bits_per_dim(metrics["test_nll"], 64, 17))
    assert 0 < metrics["test_bits_per_dim"] < 8
    assert "test_bits_per_dim_paper" not in metrics  # only for models with the paper's variant


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.n_train=5000", "digits: n_train must be between 1 and 1257"),
        ("data.options.colour=1", "data.options ['colour'] are not used by digits"),
        ("data.options.preprocess=sigmoid", "unknown preprocess 'sigmoid'"),
    ],
)
def test_bad_digits_config_is_one_line(capsys, tmp_path, override, needle):
    from freeflows.cli import main

    code = main(["train", "digits", "--set", override, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "r").exists()


def test_registry_builds_the_conv_free_form_flow(digits):
    from freeflows.experiments.config import load_config
    from freeflows.runner.train import build

    data, model = build(load_config("digits"))
    assert isinstance(model, DequantizedImageModel)
    assert isinstance(model.model, ff.FreeFormFlow) and model.model.event_shape == (1, 8, 8)
    assert torch.equal(data.test.x, digits.test.x)


@pytest.mark.slow
def test_tiny_digits_run_writes_bits_per_dim(tmp_path, monkeypatch):
    """A few steps of the digits preset through the CLI (small nets and a 40-draw mass estimate,
    to stay short); metrics.json has test_bits_per_dim of the normalised density."""
    import json

    import freeflows.eval.metrics as metrics_module
    from freeflows.cli import main

    monkeypatch.setattr(metrics_module, "DEFAULT_DRAWS", 40)
    out = tmp_path / "run"
    overrides = [
        "trainer.max_steps=6",
        "trainer.progress_bar=false",
        "trainer.val_every_epochs=1",
        "data.n_train=256",
        "model.fff-conv.hidden=8",
        "model.fff-conv.blocks=1",
    ]
    args = ["train", "digits", *[a for o in overrides for a in ("--set", o)], "--out", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and m["n_test"] == 360 and m["nll_dims"] == 64
    assert m["test_bits_per_dim"] == pytest.approx(bits_per_dim(m["test_nll"], 64, 17))
    assert m["test_bits_per_dim_paper"] == pytest.approx(bits_per_dim(m["test_nll_paper"], 64, 17))
    assert 0 < m["test_bits_per_dim"] < 8
    assert (out / "samples.png").is_file()
