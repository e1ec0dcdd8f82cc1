"""Particle systems: energies against hand-computed values and the shipped data, the data-set
builders and their splits, the Metropolis sampler, ESS and pair distances, plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from freeflows.data.particles import (
    FILES,
    center,
    dw4_energy,
    lennard_jones_energy,
    lj13_energy,
    lj13_lattice,
    load_dw4,
    load_lj13,
    metropolis,
)
from freeflows.eval.particles import effective_sample_size, interparticle_distances, model_ess


def test_interparticle_distances_by_hand():
    x = torch.tensor([[0.0, 0.0, 3.0, 0.0, 3.0, 4.0]])
    torch.testing.assert_close(interparticle_distances(x, 3, 2), torch.tensor([[3.0, 5.0, 4.0]]))
    assert interparticle_distances(torch.zeros(2, 5, 39), 13, 3).shape == (2, 5, 78)
    with pytest.raises(ValueError, match="13 particles"):
        interparticle_distances(torch.zeros(2, 38), 13, 3)


def test_dw4_energy_by_hand():
    # A square of side 4: four sides at d0 (no energy) and two diagonals at 4 sqrt 2.
    square = torch.tensor([[0.0, 0.0, 4.0, 0.0, 0.0, 4.0, 4.0, 4.0]], dtype=torch.float64)
    r = 4 * math.sqrt(2) - 4
    torch.testing.assert_close(dw4_energy(square), torch.tensor([2 * (-4 * r**2 + 0.9 * r**4)]).double())
    # All four particles on one point: six pairs at d = 0, r = -4: 6 (-4 * 16 + 0.9 * 256).
    torch.testing.assert_close(dw4_energy(torch.zeros(1, 8)), torch.tensor([6 * (-64 + 0.9 * 256)]))
    # Four in a row at spacing 4: distances 4, 4, 4 (r = 0), 8, 8 (r = 4) and 12 (r = 8):
    # 2 (-4 * 16 + 0.9 * 256) + (-4 * 64 + 0.9 * 4096) = 332.8 + 3430.4.
    line = torch.tensor([[0.0, 0.0, 4.0, 0.0, 8.0, 0.0, 12.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(dw4_energy(line), torch.tensor([3763.2], dtype=torch.float64))


def test_lennard_jones_by_hand():
    # Two particles at r_m = 1: pair term 2 (1 - 2) = -2; trap 1/2 (0.5^2 + 0.5^2) = 0.25.
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(lennard_jones_energy(x, 2, 3), torch.tensor([-1.75], dtype=torch.float64))
    # At d = 2^(1/6) * 1 the pair term is 2 (1/4 - 1) = -1.5.
    s = 2 ** (1 / 6)
    x = torch.tensor([[0.0, 0.0, 0.0, s, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(lennard_jones_energy(x, 2, 3), torch.tensor([-1.5 + 0.25 * s**2]).double())


def test_lj13_energy_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    x = lj13_lattice(3, generator=gen) + 0.1 * torch.randn(3, 39, generator=gen, dtype=torch.float64)
    expected = []
    for row in x.tolist():
        p = np.array(row).reshape(13, 3)
        e = 0.0
        for i in range(13):
            for j in range(i + 1, 13):
                d = np.linalg.norm(p[i] - p[j])
                e += 2 * (d**-12 - 2 * d**-6)
        e += 0.5 * ((p - p.mean(0)) ** 2).sum()
        expected.append(e)
    torch.testing.assert_close(lj13_energy(x), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("energy, n, d", [(dw4_energy, 4, 2), (lj13_energy, 13, 3)])
def test_energies_are_invariant_and_differentiable(energy, n, d):
    gen = torch.Generator().manual_seed(1)
    x = (lj13_lattice(4, generator=gen) if n == 13 else 2 * torch.randn(4, 8, generator=gen)).double()
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    perm = torch.randperm(n, generator=gen)
    y = ((x.reshape(4, n, d) @ q.T + 5.0)[:, perm]).reshape(4, n * d)
    torch.testing.assert_close(energy(y), energy(x))
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(x).sum(), x)
    assert torch.isfinite(grad).all()
    # Translation invariance: forces sum to zero over particles.
    torch.testing.assert_close(grad.reshape(4, n, d).sum(1), torch.zeros(4, d).double(), atol=1e-8, rtol=0)


def test_dw4_data_set():
    data = load_dw4()
    assert data.kind == "particles" and data.event_shape == (8,)
    assert (len(data.train), len(data.val), len(data.test)) == (100000, 5000, 5000)
    assert data.meta["n_particles"] == 4 and data.meta["n_dims"] == 2 and data.meta["energy"] is dw4_energy
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == torch.float32
        assert split.x.reshape(-1, 4, 2).mean(1).abs().max() < 1e-5
    # Mean energy of the shipped training samples (data README): -22.48.
    assert dw4_energy(data.train.x.double()).mean().item() == pytest.approx(-22.48, abs=0.01)
    # Test split: rows 5000-9999 of the shipped validation file, whatever the seed.
    raw = torch.from_numpy(np.load(FILES / "val_split_DW4.npy"))
    torch.testing.assert_close(data.test.x, center(raw[5000:], 4, 2))
    small = load_dw4(seed=3, n_train=1000)
    assert len(small.train) == 1000
    torch.testing.assert_close(small.test.x, data.test.x)
    torch.testing.assert_close(load_dw4(seed=3, n_train=1000).train.x, small.train.x)
    assert not torch.equal(load_dw4(seed=4, n_train=1000).train.x, small.train.x)
    with pytest.raises(ValueError, match="n_train"):
        load_dw4(n_train=0)


def test_lj13_data_set():
    data = load_lj13()
    assert data.kind == "particles" and data.event_shape == (39,)
    assert (len(data.val), len(data.test)) == (5000, 5000)
    assert len(data.train) == 20000
    assert data.meta["n_particles"] == 13 and data.meta["n_dims"] == 3
    # Mean energy of the shipped LJ13 file (data README): -43.00.
    heldout = torch.cat([data.val.x, data.test.x]).double()
    assert lj13_energy(heldout).mean().item() == pytest.approx(-43.00, abs=0.01)
    # The MCMC training set matches the shipped file in energy and pair distances.
    train = data.train.x.double()
    assert lj13_energy(train).mean().item() == pytest.approx(-43.00, abs=0.3)
    assert lj13_energy(train).std().item() == pytest.approx(lj13_energy(heldout).std().item(), rel=0.1)
    dt, dh = interparticle_distances(train, 13, 3), interparticle_distances(heldout, 13, 3)
    assert dt.mean().item() == pytest.approx(dh.mean().item(), abs=0.01)
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    torch.testing.assert_close(dt.flatten().quantile(qs), dh.flatten().quantile(qs), atol=0.03, rtol=0)
    assert train.reshape(-1, 13, 3).mean(1).abs().max() < 1e-5


def test_metropolis_samples_a_gaussian():
    """Exactness of the accept rule: 2000 chains on N(0, diag(1, 4)) give its moments."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 2.0], dtype=torch.float64)

    def energy(x):
        return 0.5 * (x / scale).square().sum(-1)

    x0 = 3 * torch.ones(2000, 2, dtype=torch.float64)
    out = metropolis(energy, x0, 100, burn_in=100, thin=50, step=0.5, generator=gen)
    assert out.samples.shape == (2, 2000, 2) and out.energies.shape == (2, 2000)
    x = out.samples[-1]
    torch.testing.assert_close(x.mean(0), torch.zeros(2).double(), atol=0.15, rtol=0)
    torch.testing.assert_close(x.std(0), scale, atol=0.1, rtol=0.05)
    assert 0.2 < out.acceptance.mean() < 0.45  # adapted towards 0.3


def test_metropolis_dw4_is_sane():
    """A tiny DW4 run from data keeps energies near the data and the centre of mass at zero."""
    gen = torch.Generator().manual_seed(0)
    x0 = load_dw4().val.x[:128].double()
    out = metropolis(dw4_energy, x0, 200, burn_in=100, thin=20, n_particles=4, generator=gen)
    assert out.samples.shape == (10, 128, 8)
    assert torch.isfinite(out.energies).all()
    assert -25.0 < out.energies.mean().item() < -20.0
    drift = out.samples.reshape(10, 128, 4, 2).mean(2) - x0.reshape(128, 4, 2).mean(1)
    assert drift.abs().max() < 1e-12, "mean-free proposals keep the centre of mass"
    torch.testing.assert_close(out.energies[-1], dw4_energy(out.samples[-1]))
    assert 0.15 < out.acceptance.mean() < 0.5
    assert not torch.equal(out.last, x0)


def test_effective_sample_size():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=gen, dtype=torch.float64)

    def energy(x):
        return 0.5 * x.square()

    # Exact model: log q = -E - log Z, so every weight is the same.
    exact = -energy(x) - 0.5 * math.log(2 * math.pi)
    assert model_ess(energy, x, exact).item() == pytest.approx(1.0, abs=1e-12)
    # A model ten times too narrow: samples from it have very uneven weights.
    y = 0.1 * x
    narrow = -0.5 * (y / 0.1).square() - math.log(0.1) - 0.5 * math.log(2 * math.pi)
    assert model_ess(energy, y, narrow).item() < 0.2
    # A model thirty times too wide: ESS -> sqrt(2 * 30^2 - 1) / 30^2 = 0.047.
    z = 30 * x
    wide = -0.5 * (z / 30).square() - math.log(30) - 0.5 * math.log(2 * math.pi)
    assert model_ess(energy, z, wide).item() < 0.1
    # One dominant weight: ESS = 1/n; a constant shift changes nothing; no overflow.
    log_w = torch.tensor([0.0, -1e4, -1e4, -1e4])
    assert effective_sample_size(log_w).item() == pytest.approx(0.25)
    assert effective_sample_size(log_w + 1e5).item() == pytest.approx(0.25)
    lw = torch.randn(100, generator=gen)
    torch.testing.assert_close(effective_sample_size(lw + 3.0), effective_sample_size(lw))
    w = lw.double().exp()
    assert effective_sample_size(lw).item() == pytest.approx((w.sum() ** 2 / (100 * w.square().sum())).item())
    with pytest.raises(ValueError, match="NaN"):
        effective_sample_size(torch.tensor([0.0, float("nan")]))


def test_particle_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from freeflows.plots.particles import plot_distance_histogram, plot_energy_histogram

    data = load_dw4().val.x[:500]
    samples = data + 0.1 * torch.randn(data.shape, generator=torch.Generator().manual_seed(0))
    p1 = plot_energy_histogram(dw4_energy, samples, data, tmp_path / "energy.png")
    p2 = plot_distance_histogram(samples, data, 4, 2, tmp_path / "sub" / "distances.png")
    for p in (p1, p2):
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_histogram_range_follows_the_data_not_exploding_samples():
    from freeflows.plots.particles import _data_range

    data = np.random.default_rng(0).normal(-43.0, 3.0, size=5000)
    lo, hi = _data_range(data)
    q001, q999 = np.quantile(data, [0.001, 0.999])
    assert lo < q001 and hi > q999  # all but the data's extreme tails is shown, with room above
    assert hi < q999 + 1.01 * (q999 - q001)  # a sample at 1e6 energy does not stretch the axis
    assert _data_range(np.array([])) == (0.0, 1.0)
