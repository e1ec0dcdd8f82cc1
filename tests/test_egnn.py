"""EGNN: identity at initialisation, E(n) and permutation equivariance, and a free-form flow
built from EGNNs with a mean-free latent whose density is invariant."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import jacfwd

import freeflows
from freeflows.nets.egnn import EGNN, EGNNVelocity

SYSTEMS = [(4, 2), (13, 3)]


def perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so that the network is far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def orthogonal(d: int, det: float, gen: torch.Generator) -> torch.Tensor:
    """A random orthogonal matrix with determinant ``det`` (+1 rotation, -1 reflection)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) * det < 0:
        q[:, 0] = -q[:, 0]
    return q


def transforms(n: int, d: int, seed: int = 1):
    """Named group actions on flattened configurations, and their action on displacements
    (translations act trivially on displacements)."""
    gen = torch.Generator().manual_seed(seed)
    rot, ref = orthogonal(d, 1.0, gen), orthogonal(d, -1.0, gen)
    shift = 3 * torch.randn(1, 1, d, generator=gen, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen)
    while torch.equal(perm, torch.arange(n)):
        perm = torch.randperm(n, generator=gen)

    def act(x, q=None, t=None, p=None):
        y = x.reshape(x.shape[0], n, d)
        if q is not None:
            y = y @ q.T
        if t is not None:
            y = y + t
        if p is not None:
            y = y[:, p]
        return y.reshape(x.shape)

    return {
        "rotation": (lambda x: act(x, q=rot), lambda x: act(x, q=rot)),
        "reflection": (lambda x: act(x, q=ref), lambda x: act(x, q=ref)),
        "translation": (lambda x: act(x, t=shift), lambda x: x),
        "permutation": (lambda x: act(x, p=perm), lambda x: act(x, p=perm)),
        "all": (lambda x: act(x, q=ref, t=shift, p=perm), lambda x: act(x, q=ref, p=perm)),
    }


def configurations(n: int, d: int, batch: int = 6, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(batch, n * d, generator=gen, dtype=torch.float64)


def com(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    return x.reshape(x.shape[0], n, d).mean(dim=1)


@pytest.mark.parametrize("n, d", SYSTEMS)
def test_identity_at_init(n, d):
    torch.manual_seed(0)
    x = configurations(n, d)
    assert torch.equal(EGNN(n, d, hidden=16, layers=3).double()(x), x)
    assert torch.equal(
        EGNNVelocity(n, d, hidden=16, layers=3).double()(torch.tensor(0.5), x), torch.zeros_like(x)
    )


def test_gradients_reach_the_network_at_init():
    net = EGNN(4, 2, hidden=16, layers=2).double()
    x = configurations(4, 2)
    net(x).square().sum().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert grads, "the identity network must still receive gradients"


@pytest.mark.parametrize("n, d", SYSTEMS)
@pytest.mark.parametrize("group", ["rotation", "reflection", "translation", "permutation", "all"])
def test_egnn_equivariance(n, d, group):
    torch.manual_seed(0)
    net = perturb(EGNN(n, d, hidden=16, layers=3).double())
    x = configurations(n, d)
    on_x, _ = transforms(n, d)[group]
    y = net(x)
    assert (y - x).abs().max() > 0.1, "the perturbed network must not be the identity"
    torch.testing.assert_close(net(on_x(x)), on_x(y), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("n, d", SYSTEMS)
def test_egnn_keeps_centre_of_mass(n, d):
    torch.manual_seed(0)
    net = perturb(EGNN(n, d, hidden=16, layers=3).double())
    x = configurations(n, d)
    torch.testing.assert_close(com(net(x), n, d), com(x, n, d), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n, d", SYSTEMS)
@pytest.mark.parametrize("group", ["rotation", "reflection", "translation", "permutation", "all"])
def test_velocity_equivariance(n, d, group):
    torch.manual_seed(0)
    field = perturb(EGNNVelocity(n, d, hidden=16, layers=2).double())
    x = configurations(n, d)
    t = torch.tensor(0.3, dtype=torch.float64)
    on_x, on_v = transforms(n, d)[group]
    v = field(t, x)
    assert v.abs().max() > 0.1
    torch.testing.assert_close(com(v, n, d), torch.zeros(x.shape[0], d, dtype=x.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(field(t, on_x(x)), on_v(v), atol=1e-10, rtol=1e-10)


def test_velocity_time_input():
    torch.manual_seed(0)
    field = perturb(EGNNVelocity(4, 2, hidden=16, layers=2).double())
    x = configurations(4, 2, batch=5)
    t = torch.tensor(0.7, dtype=torch.float64)
    v = field(t, x)
    torch.testing.assert_close(field(t.expand(5), x), v)
    torch.testing.assert_close(field(0.7, x), v)
    times = torch.linspace(0, 1, 5, dtype=torch.float64)
    per_row = field(times, x)
    torch.testing.assert_close(per_row[2:3], field(times[2], x[2:3]))
    assert (field(torch.tensor(0.0, dtype=torch.float64), x) - v).abs().max() > 1e-3, "t must matter"
    with pytest.raises(ValueError, match="one entry per row"):
        field(torch.zeros(3), x)


def test_velocity_divergence_with_torch_func():
    """A CNF takes the exact trace of dv/dx with torch.func; it must work and be invariant."""
    torch.manual_seed(0)
    n, d = 4, 2
    field = perturb(EGNNVelocity(n, d, hidden=16, layers=2).double())
    x = configurations(n, d, batch=1)
    t = torch.tensor(0.2, dtype=torch.float64)
    on_x, _ = transforms(n, d)["all"]

    def div(x):
        return torch.trace(jacfwd(lambda xi: field(t, xi.unsqueeze(0)).squeeze(0))(x[0]))

    torch.testing.assert_close(div(on_x(x)), div(x), atol=1e-10, rtol=1e-10)


def test_egnn_condition_and_errors():
    net = EGNN(4, 2, hidden=8, layers=1, condition_dim=3).double()
    x = configurations(4, 2, batch=2)
    assert net(x, torch.zeros(2, 3, dtype=torch.float64)).shape == x.shape
    with pytest.raises(ValueError, match="c is missing"):
        net(x)
    with pytest.raises(ValueError, match="expects 4 particles"):
        EGNN(4, 2)(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="n_particles >= 2"):
        EGNN(1, 3)


def flow(n: int, d: int, hidden: int = 16, layers: int = 2) -> freeflows.FreeFormFlow:
    torch.manual_seed(0)
    model = freeflows.FreeFormFlow(
        EGNN(n, d, hidden, layers), EGNN(n, d, hidden, layers), freeflows.MeanFreeNormal(n, d)
    ).double()
    perturb(model.encoder, seed=3)
    perturb(model.decoder, seed=4)
    return model


@pytest.mark.parametrize("variant", ["decoder", "encoder", "paper"])
def test_free_form_flow_log_prob_invariant(variant):
    n, d = 4, 2
    model = flow(n, d)
    # Points in the decoder's range (its draws), so that the decoder-based solve has a root, and
    # only those whose solve converges from f(x): the Newton iterates are then equivariant. This
    # random decoder is far from injective, and a restart from a fixed set of latent draws (which
    # are not permuted with x) can find another of its roots.
    model.solve_restarts = 0
    x = model.sample(8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x = x[model.invert_decoder(x).converged]
    assert x.shape[0] >= 4
    lp = model.log_prob(x, variant=variant)
    assert torch.isfinite(lp).all()
    # Not the latent density: the flow is not the identity.
    assert (lp - model.latent.log_prob(x)).abs().max() > 1e-2
    for group, (on_x, _) in transforms(n, d).items():
        torch.testing.assert_close(model.log_prob(on_x(x), variant=variant), lp, atol=1e-9, rtol=0, msg=group)


def test_free_form_flow_log_prob_invariant_lj13_size():
    n, d = 13, 3
    model = flow(n, d, hidden=8, layers=1)
    x = model.latent.center(configurations(n, d, batch=2))
    lp = model.log_prob(x)
    assert (lp - model.latent.log_prob(x)).abs().max() > 1e-2
    on_x, _ = transforms(n, d)["all"]
    torch.testing.assert_close(model.log_prob(on_x(x)), lp, atol=1e-9, rtol=0)


def test_identity_flow_has_latent_density():
    model = freeflows.FreeFormFlow(
        EGNN(4, 2, 8, 1), EGNN(4, 2, 8, 1), freeflows.MeanFreeNormal(4, 2)
    ).double()
    x = model.latent.center(configurations(4, 2))
    # MeanFreeNormal stores its basis in float32, so Q^T Q = I only to ~1e-8 even in float64.
    torch.testing.assert_close(model.log_prob(x), model.latent.log_prob(x), atol=1e-6, rtol=0)


def test_free_form_flow_samples_are_centred_and_loss_trains():
    n, d = 4, 2
    model = flow(n, d)
    x = model.sample(64, generator=torch.Generator().manual_seed(0))
    assert x.shape == (64, n * d)
    torch.testing.assert_close(com(x, n, d), torch.zeros(64, d, dtype=x.dtype), atol=1e-12, rtol=0)
    data = model.latent.center(configurations(n, d, batch=16))
    loss = model.loss(data)
    loss.value.backward()
    grads = torch.cat([p.grad.flatten() for p in model.encoder.parameters() if p.grad is not None])
    assert torch.isfinite(loss.value) and torch.isfinite(grads).all() and grads.abs().sum() > 0


@pytest.mark.slow
def test_free_form_egnn_flow_learns_dw4():
    """600 Adam steps on DW4 bring the normalised validation NLL from ~18.7 (identity) below 11,
    with at most 25 of 500 rows unsolved.
    (Reference runs: 12.98 after 300 steps, 10.55 after 400; 8.19 after 1500 with a cosine
    schedule.) Runs single-threaded: two threads on a shared 2-core machine were 13x slower."""
    from freeflows.data.particles import load_dw4

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        data = load_dw4(seed=0, n_train=20000)
        model = freeflows.FreeFormFlow(EGNN(4, 2, 32, 3), EGNN(4, 2, 32, 3), freeflows.MeanFreeNormal(4, 2))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        val = data.val.x[:500]
        with torch.no_grad():
            before = -model.log_prob(val).mean().item()
        for _ in range(600):
            batch = data.train.x[torch.randint(0, len(data.train), (256,))]
            loss = model.loss(batch)
            opt.zero_grad()
            loss.value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            log_q = model.log_prob(val)  # normalised: NaN where the root solve fails
        unsolved = int(torch.isnan(log_q).sum())
        after = -log_q.nanmean().item()
    finally:
        torch.set_num_threads(threads)
    assert unsolved <= 25, unsolved  # 17 of 500 were unsolved at seed 0
    assert before > 17.0 and after < 11.0, (before, after)
