"""The named exact flows and the model contract: densities, samples, conditions, gradients,
state dicts, builders and a quick learning check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from freeflows.contract import DensityModel, Loss
from freeflows.experiments.registry import MODEL_KINDS
from freeflows.flows import IAF, MAF, NICE, Flow, Glow, PlanarFlow, RealNVP

CLASSIC = ("planar", "nice", "realnvp", "glow", "maf", "iaf")
CLASSIC_BUILDERS = {kind: MODEL_KINDS[kind].build for kind in CLASSIC}

C = 3
SMALL = {
    "planar": lambda d, cd: PlanarFlow(d, cd, transforms=4),
    "nice": lambda d, cd: NICE(d, cd, transforms=4, hidden=16),
    "realnvp": lambda d, cd: RealNVP(d, cd, transforms=4, hidden=16),
    "glow": lambda d, cd: Glow(d, cd, steps=3, hidden=16),
    "maf": lambda d, cd: MAF(d, cd, transforms=3, hidden=16),
    "iaf": lambda d, cd: IAF(d, cd, transforms=3, hidden=16),
    "glow-image": lambda d, cd: Glow((1, 4, 4), cd, steps=2, levels=2, hidden=8),
}
KINDS = list(SMALL)


pytestmark = pytest.mark.usefixtures("one_thread")


def perturb(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def make(kind: str, condition_dim: int | None = None, d: int = 3, seed: int = 0, dtype=torch.float64):
    """A flow with ActNorm initialised on data and all parameters perturbed, and a data batch."""
    torch.manual_seed(seed)
    flow = SMALL[kind](d, condition_dim).to(dtype)
    x = torch.randn(16, *flow.event_shape, dtype=dtype)
    c = None if condition_dim is None else torch.randn(16, condition_dim, dtype=dtype)
    with torch.no_grad():
        flow.log_prob(x, c)  # data-dependent initialisation of ActNorm
    perturb(flow, seed=seed)
    return flow, x, c


@pytest.mark.parametrize("kind", KINDS)
def test_contract_and_shapes(kind):
    flow, x, c = make(kind, C)
    assert isinstance(flow, DensityModel) and isinstance(flow, Flow)
    lp = flow.log_prob(x, c)
    assert lp.shape == (16,) and torch.isfinite(lp).all()
    loss = flow.loss(x, c)
    assert isinstance(loss, Loss) and loss.value.dim() == 0
    assert torch.allclose(loss.value, -lp.mean()) and torch.allclose(loss.parts["nll"], -lp.mean())
    assert not loss.parts["nll"].requires_grad
    # one condition [C]: n draws from p(x|c); [B, C]: n draws for each condition, [n, B, *event]
    s = flow.sample(5, c[0])
    assert s.shape == (5, *flow.event_shape) and s.dtype == torch.float64 and torch.isfinite(s).all()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    many = flow.sample(2, c[:4], generator=g1)
    assert many.shape == (2, 4, *flow.event_shape)
    # draw [i, j] is latent draw i * 4 + j mapped under condition j
    z = flow.latent.sample(8, generator=g2)
    assert torch.allclose(many.reshape(8, *flow.event_shape), flow.transform.inverse(z, c[:4].repeat(2, 1)))
    # log_prob takes any leading batch shape, with c broadcast against it
    lp_many = flow.log_prob(many, c[:4])
    assert lp_many.shape == (2, 4)
    assert torch.allclose(lp_many[1, 3], flow.log_prob(many[1, 3], c[3]))
    assert flow.log_prob(many[1, 3], c[3]).shape == ()
    # samples are the inverse of the density's map
    z, _ = flow.transform(s, c[0].expand(5, -1))
    assert torch.allclose(flow.transform.inverse(z, c[0].expand(5, -1)), s, atol=1e-8)
    # the condition matters
    assert not torch.allclose(flow.log_prob(x, c), flow.log_prob(x, c.flip(0)))
    # a [C] condition is broadcast to every row
    assert torch.allclose(flow.log_prob(x, c[0]), flow.log_prob(x, c[0].expand(16, -1)))


@pytest.mark.parametrize("kind", KINDS)
def test_condition_and_data_errors(kind):
    flow, x, c = make(kind, C)
    with pytest.raises(ValueError, match="conditional"):
        flow.log_prob(x)
    with pytest.raises(ValueError, match="expected"):
        flow.log_prob(x, torch.randn(16, C + 1, dtype=x.dtype))
    with pytest.raises(ValueError, match="does not broadcast"):
        flow.log_prob(x, torch.randn(5, C, dtype=x.dtype))
    with pytest.raises(ValueError, match="expected"):
        flow.sample(4, torch.randn(C + 2, dtype=x.dtype))
    with pytest.raises(ValueError, match=r"dtype torch.float32 but the model is torch.float64"):
        flow.log_prob(x.float(), c)
    with pytest.raises(ValueError, match=r"c has dtype torch.float32"):
        flow.sample(2, c.float())
    bad = x.clone()
    bad.view(16, -1)[2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        flow.log_prob(bad, c)
    with pytest.raises(ValueError, match="shape"):
        flow.log_prob(x.reshape(16, -1)[:, :-1], c)
    unconditional, x, _ = make(kind, None)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional.log_prob(x, torch.randn(16, C, dtype=x.dtype))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional.sample(3, torch.randn(C, dtype=x.dtype))


def test_image_flow_given_vectors():
    flow = Glow((1, 8, 8), steps=1, levels=2, hidden=8)
    with pytest.raises(ValueError, match=r"shape"):
        flow.log_prob(torch.randn(4, 64))
    with pytest.raises(ValueError, match="images"):
        flow.transform(torch.randn(4, 64))
    with pytest.raises(ValueError, match="vectors"):
        RealNVP((1, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        Glow((1, 6, 6), levels=2)
    with pytest.raises(ValueError, match="at least 2"):
        RealNVP(1)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind):
    """From the default initialisation (zero last layers), a few Adam steps, then every parameter
    tensor gets a non-zero gradient."""
    torch.manual_seed(0)
    flow = SMALL[kind](3, C)
    x = torch.randn(64, *flow.event_shape) * 0.7 + 0.5
    c = torch.randn(64, C)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        flow.loss(x, c).value.backward()
        opt.step()
    opt.zero_grad()
    flow.loss(x, c).value.backward()
    missing = [n for n, p in flow.named_parameters() if p.grad is None or not (p.grad.abs().sum() > 0)]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind, tmp_path):
    flow, x, c = make(kind, C, seed=1)
    path = tmp_path / f"{kind}.pt"
    torch.save(flow.state_dict(), path)
    torch.manual_seed(123)
    other = perturb(SMALL[kind](3, C).double(), seed=123)
    assert not torch.allclose(other.log_prob(x, c), flow.log_prob(x, c))
    fresh = SMALL[kind](3, C).double()  # different random init, ActNorm not initialised
    fresh.load_state_dict(torch.load(path))
    assert torch.allclose(fresh.log_prob(x, c), flow.log_prob(x, c), atol=1e-12)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.allclose(fresh.sample(3, c[0], generator=g1), flow.sample(3, c[0], generator=g2), atol=1e-10)


@pytest.mark.parametrize("kind", ["planar", "nice", "realnvp", "glow", "maf", "iaf"])
def test_density_integrates_to_one(kind):
    """In 2-D, exp(log_prob) summed over a fine grid is 1: the log-determinants carry the right
    sign and scale, end to end."""
    flow, _, _ = make(kind, None, d=2)
    n, half = 301, 9.0
    axis = torch.linspace(-half, half, n, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum() * (axis[1] - axis[0]) ** 2
    assert abs(mass.item() - 1) < 5e-3, mass.item()


def banana(n: int, generator: torch.Generator) -> torch.Tensor:
    """A bent, shifted 2-D distribution."""
    a = torch.randn(n, generator=generator)
    b = 0.5 * a**2 - 0.5 + 0.3 * torch.randn(n, generator=generator)
    return torch.stack([a + 1.0, b - 1.0], dim=1)


@pytest.mark.parametrize("kind", ["planar", "nice", "realnvp", "glow", "maf", "iaf"])
def test_learns_a_2d_density(kind):
    """200 Adam steps (batch 256) lower the held-out NLL by more than 0.6 nats.

    Under a standard normal the held-out NLL is about 3.6 nats; the data's entropy is about 1.6.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    flow = CLASSIC_BUILDERS[kind]((2,), None, **({} if kind == "planar" else {"hidden": 32}))
    test = banana(2000, g)
    with torch.no_grad():
        flow.log_prob(test[:256])  # ActNorm initialisation, as the first training batch would
        before = -flow.log_prob(test).mean().item()
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3 if kind != "planar" else 2e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = flow.loss(banana(256, g))
        loss.value.backward()
        opt.step()
    with torch.no_grad():
        after = -flow.log_prob(test).mean().item()
    assert math.isfinite(after)
    assert after < before - 0.6, (before, after)


def test_builders():
    assert set(CLASSIC_BUILDERS) == {"planar", "nice", "realnvp", "glow", "maf", "iaf"}
    for kind, build in CLASSIC_BUILDERS.items():
        model = build((4,), 2)
        assert isinstance(model, DensityModel) and model.event_shape == (4,) and model.condition_dim == 2
        assert type(model).__name__.lower() == {"planar": "planarflow"}.get(kind, kind)
        with pytest.raises(ValueError, match="valid options"):
            build((4,), None, not_an_option=3)
    model = CLASSIC_BUILDERS["realnvp"]((2,), None, hidden=8, layers=1, transforms=2)
    assert len(model.transform) == 2
    image = CLASSIC_BUILDERS["glow"]((1, 8, 8), None, steps=1, levels=3, hidden=4)
    assert image.sample(2).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="vectors"):
        CLASSIC_BUILDERS["maf"]((1, 8, 8), None)
    with pytest.raises(ValueError, match="positive integer"):
        CLASSIC_BUILDERS["nice"]((4,), None, hidden=0)


def test_glow_learns_images():
    """Multi-scale Glow on 1x4x4 images spanned by two smooth patterns plus small noise: 60 Adam
    steps lower the held-out NLL by more than 5 nats (the data lie near a 2-D subspace)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-1, 1, 4)
    patterns = torch.stack([grid[None, :].expand(4, 4), (grid[:, None] * grid[None, :])])

    def images(n):
        coef = torch.randn(n, 2, generator=g)
        noise = 0.05 * torch.randn(n, 1, 4, 4, generator=g)
        return (coef[:, :, None, None] * patterns).sum(1, keepdim=True) + noise

    flow = Glow((1, 4, 4), steps=2, levels=2, hidden=16)
    test = images(500)
    with torch.no_grad():
        flow.log_prob(images(256))
        before = -flow.log_prob(test).mean().item()
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
    for _ in range(60):
        opt.zero_grad()
        flow.loss(images(128)).value.backward()
        opt.step()
    with torch.no_grad():
        after = -flow.log_prob(test).mean().item()
    assert after < before - 5, (before, after)
