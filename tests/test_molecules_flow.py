"""Molecules as padded point clouds: the masked EGNN, the masked mean-free latent and the
free-form flow on them (equivariance, invariance to padding, exact log-determinants on each
row's subspace, normalisation)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacrev

import freeflows as ff
from freeflows.distributions import MaskedMeanFreeNormal
from freeflows.nets.egnn import EGNN, EGNNVelocity
from freeflows.point_clouds import AtomEncoding, degrees_of_freedom, node_mask, project

N, D, K = 5, 3, 2  # padded size, coordinates, feature channels
COUNTS = torch.tensor([[3.0], [5.0], [4.0]], dtype=torch.float64)


def perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def molecules(c: torch.Tensor = COUNTS, seed: int = 1) -> torch.Tensor:
    """Events on each row's subspace: mean-free real coordinates, zero padding."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(c.shape[0], N, D + K, generator=gen, dtype=torch.float64)
    return project(x, c, D)


def subspace_basis(n: int, max_points: int = N, d: int = D, k: int = K) -> torch.Tensor:
    """Orthonormal basis of S_n (flattened node-major), from the mean-free basis of n points."""
    q = ff.MeanFreeNormal(n, d).double().basis if n > 1 else torch.zeros(d, 0, dtype=torch.float64)
    width = d + k
    cols = []
    for j in range(q.shape[1]):
        v = torch.zeros(max_points, width, dtype=torch.float64)
        v[:n, :d] = q[:, j].reshape(n, d)
        cols.append(v.flatten())
    for i in range(n):
        for f in range(k):
            v = torch.zeros(max_points, width, dtype=torch.float64)
            v[i, d + f] = 1.0
            cols.append(v.flatten())
    return torch.stack(cols, dim=1)


def group_actions(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    shift = 2 * torch.randn(D, generator=gen, dtype=torch.float64)

    def rotate(x, c):
        return torch.cat([x[..., :D] @ q.T, x[..., D:]], dim=-1)

    def translate(x, c):
        mask = node_mask(c, N).unsqueeze(-1).to(x)
        return x + torch.cat([shift.expand(N, D), torch.zeros(N, K, dtype=x.dtype)], dim=-1) * mask

    def permute(x, c):  # a random permutation of each row's real atoms
        out = x.clone()
        for b, n in enumerate(c[:, -1].long().tolist()):
            out[b, :n] = x[b, torch.randperm(n, generator=gen)]
        return out

    def pad(x, c):  # garbage in the padding
        mask = node_mask(c, N).unsqueeze(-1).to(x)
        return x + 7 * torch.randn(x.shape, generator=gen, dtype=x.dtype) * (1 - mask)

    return {"rotation": rotate, "translation": translate, "permutation": permute, "padding": pad}


# -- the representation and the latent ----------------------------------------------------------
def test_atom_counts_are_checked():
    with pytest.raises(ValueError, match=r"integers in \[1, 5\]"):
        node_mask(torch.tensor([[2.5]]), 5)
    with pytest.raises(ValueError, match=r"integers in \[1, 5\]"):
        MaskedMeanFreeNormal(5, 3).log_prob(torch.zeros(1, 5, 3), torch.tensor([[0.0]]))
    assert degrees_of_freedom(torch.tensor([[1.0], [29.0]]), 29, 3, 6).tolist() == [6, 28 * 3 + 29 * 6]


def test_atom_encoding_round_trip_and_volume():
    enc = AtomEncoding(5, atomic_numbers=(1, 6, 7, 8, 9))
    types = torch.randint(0, 5, (50, 7))
    types[:, 5:] = -1
    h = enc.encode(types, dequantize=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(enc.decode(h, types >= 0), types)
    assert torch.equal(enc.decode(h), types)
    assert bool((h[:, 5:] == 0).all()) and bool((h[:, :5, :5] < 0.5).all())
    # one-hot channels: the hot one in [0.25, 0.5), the others in [0, 0.25)
    volume = torch.tensor([2 * (5 * math.log(0.25) + math.log(0.1))])
    assert torch.allclose(enc.log_volume(torch.tensor([2])), volume)
    with pytest.raises(ValueError, match="atom types"):
        enc.encode(torch.tensor([[5]]))


def test_masked_latent_density_and_draws():
    latent = MaskedMeanFreeNormal(N, D, K).double()
    c = COUNTS
    z = latent.sample(3, c, generator=torch.Generator().manual_seed(0))
    mask = node_mask(c, N)
    assert bool((z[~mask] == 0).all())
    torch.testing.assert_close(z[..., :D].sum(1), torch.zeros(3, D, dtype=z.dtype), atol=1e-12, rtol=0)
    m = (c[:, 0] - 1) * D + c[:, 0] * K
    expected = -0.5 * z.reshape(3, -1).square().sum(1) - 0.5 * m * math.log(2 * math.pi)
    torch.testing.assert_close(latent.log_prob(z, c), expected)
    # In orthonormal coordinates of S_n it is N(0, I_m): compare with the standard normal there.
    for b in range(3):
        q = subspace_basis(int(c[b, 0]))
        y = q.T @ z[b].flatten()
        standard = ff.StandardNormal(q.shape[1]).double().log_prob(y[None])[0]
        torch.testing.assert_close(latent.log_prob(z[b : b + 1], c[b : b + 1])[0], standard)
    for name, act in group_actions().items():
        torch.testing.assert_close(latent.log_prob(act(z, c), c), latent.log_prob(z, c), msg=name)


def test_masked_latent_draws_have_unit_variance_on_the_subspace():
    latent = MaskedMeanFreeNormal(N, D, K).double()
    c = torch.full((4000, 1), 4.0, dtype=torch.float64)
    z = latent.sample(4000, c, generator=torch.Generator().manual_seed(0))
    y = z.reshape(4000, -1) @ subspace_basis(4)
    cov = y.T @ y / 4000
    # each entry of the sample covariance has standard error <= sqrt(2/4000) ~ 0.022
    assert (cov - torch.eye(cov.shape[0], dtype=cov.dtype)).abs().max() < 5 * math.sqrt(2 / 4000)


# -- the masked EGNN ----------------------------------------------------------------------------
def masked_net(seed: int = 0) -> EGNN:
    torch.manual_seed(seed)
    net = EGNN(N, D, hidden=16, layers=2, condition_dim=1, features=K, masked=True).double()
    return perturb(net, seed=seed)


def test_masked_egnn_identity_at_init_and_errors():
    x = molecules()
    net = EGNN(N, D, hidden=16, layers=2, condition_dim=1, features=K, masked=True).double()
    assert torch.equal(net(x, COUNTS), x)
    with pytest.raises(ValueError, match="condition_dim >= 1"):
        EGNN(N, D, masked=True)
    with pytest.raises(ValueError, match="with 2 features"):
        net(torch.zeros(2, N, D), COUNTS[:2])


@pytest.mark.parametrize("group", ["rotation", "translation", "permutation", "padding"])
def test_masked_egnn_equivariance(group):
    net = masked_net()
    x = molecules()
    act = group_actions()[group]
    y = net(x, COUNTS)
    assert (y - x).abs().max() > 0.1
    mask = node_mask(COUNTS, N)
    assert bool((y[~mask] == 0).all()), "padding stays zero"
    torch.testing.assert_close(y[..., :D].sum(1), torch.zeros(3, D, dtype=y.dtype), atol=1e-12, rtol=0)
    if group == "permutation":  # the same permutation on input and output
        gen = torch.Generator().manual_seed(5)
        perms = [torch.randperm(int(n), generator=gen) for n in COUNTS[:, 0]]
        px, py = x.clone(), y.clone()
        for b, p in enumerate(perms):
            px[b, : len(p)], py[b, : len(p)] = x[b, p], y[b, p]
        torch.testing.assert_close(net(px, COUNTS), py, atol=1e-10, rtol=1e-10)
    elif group == "padding":  # padding content passes through and changes nothing else
        xp = act(x, COUNTS)
        yp = net(xp, COUNTS)
        torch.testing.assert_close(yp[mask], y[mask], atol=1e-12, rtol=0)
        torch.testing.assert_close(yp[~mask], xp[~mask])
    else:
        torch.testing.assert_close(net(act(x, COUNTS), COUNTS), act(y, COUNTS), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("n", [2, 4, 5])
def test_full_space_log_det_equals_the_subspace_log_det(n):
    """The identity on the complement of S_n: log|det J| on all N(d+k) coordinates equals
    log|det Q^T J Q| on the subspace (torch.func.jacrev + slogdet)."""
    net = masked_net(seed=n)
    c = torch.tensor([[float(n)]], dtype=torch.float64)
    x = molecules(c)
    jac = jacrev(lambda v: net(v.reshape(1, N, D + K), c).flatten())(x.flatten())
    q = subspace_basis(n)
    sub = torch.linalg.slogdet(q.T @ jac @ q)
    full = torch.linalg.slogdet(jac)
    assert abs(sub.logabsdet) > 1e-2, "the map must not be volume preserving for the test to bite"
    torch.testing.assert_close(full.logabsdet, sub.logabsdet, atol=1e-10, rtol=0)
    # J maps S_n into S_n: the projection of J q onto the complement vanishes
    proj = q @ q.T
    torch.testing.assert_close(jac @ q - proj @ jac @ q, torch.zeros_like(jac @ q), atol=1e-10, rtol=0)


def test_masked_velocity_is_zero_on_padding_and_mean_free():
    field = perturb(EGNNVelocity(N, D, hidden=16, layers=2, features=K, masked=True).double())
    x = molecules()
    v = field(0.3, x, COUNTS)
    mask = node_mask(COUNTS, N)
    assert v.abs().max() > 0.1 and bool((v[~mask] == 0).all())
    torch.testing.assert_close(v[..., :D].sum(1), torch.zeros(3, D, dtype=v.dtype), atol=1e-12, rtol=0)
    # its divergence on all coordinates equals the trace on S_n
    c = COUNTS[1:2]
    jac = jacrev(lambda u: field(0.3, u.reshape(1, N, D + K), c).flatten())(x[1].flatten())
    q = subspace_basis(5)
    torch.testing.assert_close(torch.trace(jac), torch.trace(q.T @ jac @ q), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="needs c"):
        field(0.3, x)


# -- the free-form flow on molecules ------------------------------------------------------------
def molecule_flow(seed: int = 0, scale: float = 0.1) -> ff.FreeFormFlow:
    torch.manual_seed(seed)
    flow = ff.FreeFormFlow.molecules(N, K, D, hidden=16, layers=2).double()
    perturb(flow.encoder, scale, seed=seed + 1)
    perturb(flow.decoder, scale, seed=seed + 2)
    return flow


def test_molecule_flow_samples_and_loss():
    flow = molecule_flow()
    x = flow.sample(1, COUNTS)
    assert x.shape == (1, 3, N, D + K)
    x = x[0]
    mask = node_mask(COUNTS, N)
    assert bool((x[~mask] == 0).all())
    torch.testing.assert_close(x[..., :D].sum(1), torch.zeros(3, D, dtype=x.dtype), atol=1e-10, rtol=0)
    assert flow.sample(4, torch.tensor([2.0], dtype=torch.float64)).shape == (4, N, D + K)
    loss = flow.loss(x, COUNTS)
    loss.value.backward()
    grads = [p.grad for p in flow.encoder.parameters() if p.grad is not None]
    assert torch.isfinite(loss.value) and grads and all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="atom counts"):
        flow.sample(2, torch.tensor([6.0], dtype=torch.float64))


@pytest.mark.parametrize("variant", ["decoder", "encoder", "paper"])
def test_molecule_flow_log_prob_matches_the_subspace_formula(variant):
    """log_prob on all coordinates equals the change of variables on each row's subspace."""
    flow = molecule_flow()
    x = molecules()
    lp = flow.log_prob(x, COUNTS, variant=variant)
    for b in range(3):
        c = COUNTS[b : b + 1]
        q = subspace_basis(int(c[0, 0]))
        def encode(v, c=c):
            return flow.encode(v.reshape(1, N, D + K), c).flatten()

        def decode(v, c=c):
            return flow.decode(v.reshape(1, N, D + K), c).flatten()

        z = flow.encode(x[b : b + 1], c)
        if variant == "encoder":
            jac, sign = jacrev(encode)(x[b].flatten()), 1.0
        else:
            if variant == "decoder":
                z = flow.invert_decoder(x[b : b + 1], c).z
            jac, sign = jacrev(decode)(z.flatten()), -1.0
        log_det = torch.linalg.slogdet(q.T @ jac @ q).logabsdet
        m = q.shape[1]
        y = q.T @ z.flatten()
        expected = -0.5 * y.square().sum() - 0.5 * m * math.log(2 * math.pi) + sign * log_det
        torch.testing.assert_close(lp[b], expected, atol=1e-8, rtol=0)
    assert (lp - flow.latent.log_prob(x, COUNTS)).abs().max() > 1e-2


@pytest.mark.parametrize("group", ["rotation", "translation", "permutation", "padding"])
def test_molecule_flow_log_prob_invariance(group):
    flow = molecule_flow()
    x = molecules()
    act = group_actions()[group]
    lp = flow.log_prob(x, COUNTS)
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(flow.log_prob(act(x, COUNTS), COUNTS), lp, atol=1e-8, rtol=0)


def test_molecule_flow_sample_and_log_prob_agree():
    flow = molecule_flow()
    x, log_q = flow.sample_and_log_prob(1, COUNTS)
    torch.testing.assert_close(flow.log_prob(x, COUNTS.expand(1, 3, 1)), log_q, atol=1e-8, rtol=0)


def test_molecule_flow_density_integrates_to_one():
    """Two real atoms on a line (d = 1, no features) padded to three nodes: the support is the
    1-D line a (1, -1, 0) / sqrt(2); the decoder density along it integrates to one (the
    perturbation is small enough for the decoder to stay injective on [-8, 8])."""
    torch.manual_seed(0)
    flow = ff.FreeFormFlow.molecules(3, 0, 1, hidden=16, layers=2).double()
    perturb(flow.decoder, 0.02, seed=1)
    perturb(flow.encoder, 0.02, seed=2)
    a = torch.linspace(-8, 8, 1601, dtype=torch.float64)
    u = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / math.sqrt(2)
    x = (a[:, None] * u).reshape(-1, 3, 1)
    c = torch.tensor([2.0], dtype=torch.float64)
    with torch.no_grad():
        log_q = flow.log_prob(x, c)
    assert torch.isfinite(log_q).all()
    mass = float(torch.trapezoid(log_q.exp(), a))
    assert abs(mass - 1.0) < 1e-4, mass
    # the map is not the identity: the density differs from the latent's in the bulk
    gap = (log_q - flow.latent.log_prob(x, c.expand(len(a), 1)))[600:1000].abs().max()
    assert gap > 0.01


def test_molecule_flow_save_and_load(tmp_path):
    flow = ff.FreeFormFlow.molecules(N, K, D, hidden=8, layers=1)
    ff.save(flow, tmp_path / "m.pt")
    same = ff.load(tmp_path / "m.pt")
    x = molecules().float()
    c = COUNTS.float()
    torch.testing.assert_close(same.log_prob(x, c, variant="paper"), flow.log_prob(x, c, variant="paper"))
    assert same.solve_restarts == 64


# -- the equivariant CNF (E-NF) baseline on the same representation ------------------------------
def molecule_cnf() -> ff.CNF:
    torch.manual_seed(0)
    cnf = ff.CNF.molecules(N, K, D, hidden=16, layers=2, rtol=1e-9, atol=1e-9).double()
    perturb(cnf.velocity, 0.2, seed=1)
    return cnf


@pytest.mark.parametrize("group", ["rotation", "translation", "permutation", "padding"])
def test_molecule_cnf_log_prob_invariance(group):
    cnf = molecule_cnf()
    x = molecules()
    lp = cnf.log_prob(x, COUNTS)
    assert (lp - cnf.latent.log_prob(x, COUNTS)).abs().max() > 1e-2, "the field must move the density"
    act = group_actions()[group]
    torch.testing.assert_close(cnf.log_prob(act(x, COUNTS), COUNTS), lp, atol=1e-6, rtol=0)


def test_molecule_cnf_draws_and_their_density():
    cnf = molecule_cnf()
    x, log_q = cnf.sample_and_log_prob(1, COUNTS)
    assert x.shape == (1, 3, N, D + K)
    mask = node_mask(COUNTS, N)
    assert bool((x[0][~mask] == 0).all())
    torch.testing.assert_close(cnf.log_prob(x, COUNTS.expand(1, 3, 1)), log_q, atol=1e-6, rtol=0)
    # the Hutchinson trace (full-space probes) estimates the same density without bias
    cnf.rtol = cnf.atol = 1e-7
    reps = 100
    est = cnf.log_prob(x[0].repeat(reps, 1, 1), COUNTS.repeat(reps, 1), trace="hutchinson").reshape(reps, 3)
    se = est.std(0) / math.sqrt(reps)
    assert (se > 0).all() and ((est.mean(0) - log_q[0]).abs() < 5 * se + 1e-5).all()
