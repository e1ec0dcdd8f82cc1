"""The model contract on every model kind, built by its named constructor: shapes of ``sample``,
``rsample``, ``sample_and_log_prob`` and ``log_prob`` with and without conditions, dtype and
device errors, and saving and loading with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import freeflows as ff
from freeflows import serialization
from freeflows.nets.velocity import TimeMLP
from freeflows.transforms import ComposedTransform, Reverse

F64 = torch.float64
C = 2

#: Every named model, conditional when ``cd`` is an int. The particle models live on 3 points
#: in 2-D (events of 6 numbers); the equivariant CNF is unconditional.
BUILD = {
    "planar": lambda cd: ff.PlanarFlow(3, cd, transforms=2),
    "nice": lambda cd: ff.NICE(3, cd, transforms=2, hidden=8),
    "realnvp": lambda cd: ff.RealNVP(3, cd, transforms=2, hidden=8),
    "glow": lambda cd: ff.Glow(3, cd, steps=2, hidden=8),
    "glow-image": lambda cd: ff.Glow((1, 4, 4), cd, steps=1, levels=1, hidden=4),
    "maf": lambda cd: ff.MAF(3, cd, transforms=2, hidden=8),
    "iaf": lambda cd: ff.IAF(3, cd, transforms=2, hidden=8),
    "cnf": lambda cd: ff.CNF(3, cd, hidden=8, layers=1, rtol=1e-8, atol=1e-8),
    "fff": lambda cd: ff.FreeFormFlow.resnet(3, cd, hidden=8, blocks=1),
    "fff-egnn": lambda cd: ff.FreeFormFlow.egnn(3, 2, cd, hidden=8, layers=1),
    "ecnf": lambda cd: ff.CNF.egnn(3, 2, hidden=8, layers=1, rtol=1e-8, atol=1e-8),
}
KINDS = list(BUILD)
CONDITIONAL = [k for k in KINDS if k != "ecnf"]

pytestmark = pytest.mark.usefixtures("one_thread")


def data(model: nn.Module, rows: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *model.event_shape, generator=g, dtype=dtype)
    center = getattr(model.latent, "center", None)  # particle models: zero centre of mass
    return x if center is None else center(x)


def make(kind: str, cd: int | None, seed: int = 0, dtype: torch.dtype = F64) -> nn.Module:
    """The model with every parameter perturbed (zero-initialised last layers would make most
    maps the identity) and ActNorm initialised on data."""
    torch.manual_seed(seed)
    model = BUILD[kind](cd).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        c = None if cd is None else torch.randn(16, cd, dtype=dtype)
        model.log_prob(data(model, 16, dtype=dtype), c)  # ActNorm's data-dependent initialisation
    return model


def tolerance(kind: str) -> float:
    # adaptive ODE steps depend on the whole batch, so one row alone differs within the tolerance
    return 1e-6 if "cnf" in kind else 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_without_a_condition(kind):
    model = make(kind, None)
    event = model.event_shape
    assert model.condition_dim is None
    x = model.sample(4)
    assert x.shape == (4, *event) and x.dtype == F64 and not x.requires_grad
    lp = model.log_prob(x)
    assert lp.shape == (4,) and torch.isfinite(lp).all()
    # any leading batch shape, and none
    grid = x.reshape(2, 2, *event)
    torch.testing.assert_close(model.log_prob(grid), lp.reshape(2, 2), rtol=0, atol=tolerance(kind))
    one = model.log_prob(x[3])
    assert one.shape == ()
    torch.testing.assert_close(one, lp[3], rtol=0, atol=tolerance(kind))
    draws, log_q = model.sample_and_log_prob(3)
    assert draws.shape == (3, *event) and log_q.shape == (3,)
    assert model.rsample(2).shape == (2, *event)
    assert model.loss(grid).value.dim() == 0


@pytest.mark.parametrize("kind", CONDITIONAL)
def test_shapes_with_conditions(kind):
    """c of shape [C] gives [n, *event]; c of shape [B, C] gives [n, B, *event], draw [i, j] under
    condition j; log_prob broadcasts c against any batch shape."""
    model = make(kind, C)
    event = model.event_shape
    c = torch.randn(5, C, dtype=F64)
    assert model.sample(4, c[0]).shape == (4, *event)
    x = model.sample(3, c, generator=torch.Generator().manual_seed(1))
    assert x.shape == (3, 5, *event) and not x.requires_grad
    lp = model.log_prob(x, c)
    assert lp.shape == (3, 5) and torch.isfinite(lp).all()
    # entry [i, j] is the density of draw [i, j] under condition j alone
    torch.testing.assert_close(model.log_prob(x[2, 4], c[4]), lp[2, 4], rtol=0, atol=tolerance(kind))
    assert not torch.allclose(model.log_prob(x[2, 4], c[0]), lp[2, 4])  # the condition matters
    # the draws are latent draws in order, row i * 5 + j under condition j
    same = model.sample(1, c.repeat(3, 1), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(same.reshape(3, 5, *event), x, rtol=0, atol=tolerance(kind))
    # [C] broadcasts like [*batch, C]
    torch.testing.assert_close(model.log_prob(x, c[1]), model.log_prob(x, c[1].expand(3, 5, C)))
    draws, log_q = model.sample_and_log_prob(2, c)
    assert draws.shape == (2, 5, *event) and log_q.shape == (2, 5)
    torch.testing.assert_close(log_q, model.log_prob(draws, c), rtol=0, atol=1e-6)
    assert model.rsample(2, c).shape == (2, 5, *event)
    assert model.loss(x, c).value.dim() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_sample_has_no_graph_and_rsample_has_one(kind):
    model = make(kind, None, dtype=torch.float32)
    with torch.enable_grad():
        assert not model.sample(3).requires_grad
        assert not any(t.requires_grad for t in model.sample_and_log_prob(3))
        assert model.rsample(3).requires_grad


def test_refined_free_form_draws_are_not_reparametrised():
    model = ff.FreeFormFlow.resnet(2, sample_refine_steps=2)
    with pytest.raises(ValueError, match="sample_refine_steps = 0"):
        model.rsample(3)


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_and_device_follow_the_module(kind):
    cd = None if kind == "ecnf" else C
    model = make(kind, cd, dtype=torch.float32)
    x = data(model, 4, dtype=torch.float32)
    c = None if cd is None else torch.randn(4, cd)
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 but the model is torch.float32"):
        model.log_prob(x.double(), c)
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 but the model is torch.float32"):
        model.loss(x.double(), c)
    with pytest.raises(ValueError, match=r"x is on device meta but the model is on cpu"):
        model.log_prob(torch.empty(x.shape, device="meta"), c)
    if cd is not None:
        with pytest.raises(ValueError, match=r"c has dtype torch.float64 but the model is torch.float32"):
            model.log_prob(x, c.double())
        with pytest.raises(ValueError, match=r"c has dtype torch.float64"):
            model.sample(2, c.double())
        with pytest.raises(ValueError, match=r"c is on device meta"):
            model.sample(2, torch.empty(cd, device="meta"))
    # after .double() the same calls run
    model.double()
    assert model.log_prob(x.double(), None if c is None else c.double()).dtype == F64


def test_conditions_and_counts_are_checked():
    model = ff.RealNVP(3, C, transforms=2, hidden=8)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="does not broadcast"):
        model.log_prob(x, torch.randn(3, C))
    with pytest.raises(ValueError, match=r"expected \[2\] or \[\*batch, 2\]"):
        model.sample(2, torch.randn(4, C + 1))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        model.sample(0, torch.randn(C))
    with pytest.raises(ValueError, match="NaN in 1 row"):
        model.log_prob(x, torch.tensor([0.0, float("nan")]))
    grid = torch.randn(2, 2, 3)
    grid[1, 0, 2] = float("inf")
    with pytest.raises(ValueError, match=r"inf in 1 row\(s\), first at index \(1, 0\)"):
        model.log_prob(grid, torch.randn(C))


def test_cnf_built_from_features_and_from_any_velocity():
    model = ff.CNF(4, 2, hidden=16, layers=2, activation="silu", augment_dims=1)
    assert isinstance(model.velocity, TimeMLP) and model.velocity.features == 5
    assert model.velocity.condition_dim == 2 and model.condition_dim == 2 and model.event_shape == (4,)
    image = ff.CNF((1, 2, 2), rtol=1e-4, atol=1e-4)
    assert image.sample(3).shape == (3, 1, 2, 2)
    velocity = TimeMLP(3, condition_dim=2)
    assert ff.CNF.from_velocity(velocity, ff.StandardNormal(3)).condition_dim == 2
    with pytest.raises(TypeError, match=r"CNF.from_velocity\(velocity, latent"):
        ff.CNF(velocity, ff.StandardNormal(3))
    with pytest.raises(ValueError, match="features"):
        ff.CNF(0)
    with pytest.raises(ValueError, match="valid options"):
        ff.CNF.from_velocity(velocity, ff.StandardNormal(3), hiden=3)


# -- saving and loading --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_restore_every_named_model(kind, tmp_path):
    cd = None if kind == "ecnf" else C
    model = make(kind, cd, seed=3)
    settings = {"fff": {"sample_refine_steps": 2, "solve_rtol": 1e-6}, "cnf": {"rtol": 1e-7}}
    for key, value in settings.get(kind, {}).items():
        setattr(model, key, value)  # settings changed after construction are saved too
    path = tmp_path / "model.pt"
    ff.save(model, path)
    payload = torch.load(path, weights_only=True)
    assert payload["class"] == type(model).__name__ and payload["dtype"] == "float64"
    loaded = ff.load(path)
    assert type(loaded) is type(model)
    assert all(t.dtype == F64 for t in loaded.parameters())
    for key, value in settings.get(kind, {}).items():
        assert getattr(loaded, key) == value
    x = data(model, 6, seed=4)
    c = None if cd is None else torch.randn(6, cd, dtype=F64)
    with torch.no_grad():
        expected = model.log_prob(x, c)
        assert torch.equal(loaded.log_prob(x, c), expected)
        # the check can fail: the same constructor with another seed gives another density
        other = make(kind, cd, seed=5)
        assert not torch.allclose(other.log_prob(x, c), expected)
    one = None if cd is None else c[0]
    g1, g2 = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    assert torch.equal(loaded.sample(5, one, generator=g1), model.sample(5, one, generator=g2))


def test_save_refuses_models_built_from_your_own_networks(tmp_path):
    path = tmp_path / "model.pt"
    own = [
        ff.FreeFormFlow(ff.ResNet(3), ff.ResNet(3), ff.StandardNormal(3)),
        ff.CNF.from_velocity(TimeMLP(3), ff.StandardNormal(3)),
        ff.Flow(ComposedTransform(Reverse(3)), ff.StandardNormal(3)),
    ]

    class Renamed(ff.RealNVP):
        pass

    for model in [*own, Renamed(3)]:
        with pytest.raises(ValueError, match="state_dict"):
            ff.save(model, path)
    # the documented recipe for them: the state dict, and the same code to rebuild
    torch.manual_seed(0)
    model = own[0]
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    torch.save(model.state_dict(), path)
    rebuilt = ff.FreeFormFlow(ff.ResNet(3), ff.ResNet(3), ff.StandardNormal(3))
    rebuilt.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(4, 3)
    assert torch.equal(rebuilt.log_prob(x, variant="paper"), model.log_prob(x, variant="paper"))


def test_load_refuses_other_files(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a model saved by freeflows.save"):
        ff.load(path)
    torch.save({"format": serialization.FORMAT, "version": 99}, path)
    with pytest.raises(ValueError, match="format version 99"):
        ff.load(path)


def test_save_refuses_arguments_that_are_not_plain(tmp_path):
    model = ff.RealNVP(3)
    name, arguments = model._constructor
    model._constructor = (name, {**arguments, "clamp": torch.tensor(3.0)})
    with pytest.raises(ValueError, match="clamp"):
        ff.save(model, tmp_path / "model.pt")


def test_the_documented_examples_run():
    for module in (serialization, ff.freeform):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, (module.__name__, result)
