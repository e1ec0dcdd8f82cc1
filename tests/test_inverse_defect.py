"""The inverse-defect estimator: unbiased for ||J_g J_f - I||_F^2 against full Jacobians, zero for
an exact inverse pair, on the latent's subspace with a basis, and the flow's method."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jacrev

import freeflows as ff
from freeflows.distributions import mean_free_basis
from freeflows.inverse_defect import inverse_defect


def _mlp(d: int, seed: int, hidden: int = 16, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), act(), nn.Linear(hidden, d)).double()


def _resnet(d: int, seed: int) -> ff.ResNet:
    """A ResNet whose residual branches are not zero (it starts as the identity otherwise)."""
    torch.manual_seed(seed)
    net = ff.ResNet(d, hidden=16, depth=1, blocks=2).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return net


def _jacobians(f, g, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full Jacobians of the batched maps f at the row x0 and g at f(x0)."""
    jf = jacrev(lambda x: f(x[None])[0])(x0)
    jg = jacrev(lambda z: g(z[None])[0])(f(x0[None])[0])
    return jf, jg


def _exact(f, g, x0: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """||J_g J_f - I||_F^2 (on the subspace of ``basis``) from full Jacobians at the row x0."""
    jf, jg = _jacobians(f, g, x0)
    a = jg @ jf
    if basis is not None:
        a = basis.T @ a @ basis
    return (a - torch.eye(a.shape[0], dtype=a.dtype)).square().sum()


def _per_probe(f, g, x0, n, mode, basis=None, seed=0):
    """n independent one-probe estimates at the same point (one per repeated row)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return inverse_defect(f, g, x0.expand(n, -1), probes=1, mode=mode, basis=basis, generator=gen)


@pytest.mark.parametrize("mode", ["gaussian", "rademacher"])
@pytest.mark.parametrize("nets", ["mlp", "resnet", "generic"])
def test_unbiased_against_the_exact_frobenius_norm(mode, nets):
    d = 3
    if nets == "mlp":
        f, g = _mlp(d, 0), _mlp(d, 1)
    elif nets == "resnet":  # the structured tangent rules of freeflows.tangents
        f, g = _resnet(d, 0), _resnet(d, 1)
    else:  # a module without a structured rule: generic forward AD
        f, g = _mlp(d, 0, act=nn.Softplus), _mlp(d, 1, act=nn.Softplus)
    x0 = torch.randn(1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = _exact(f, g, x0[0])
    values = _per_probe(f, g, x0, 20_000, mode)
    mean, se = values.mean(), values.std() / values.numel() ** 0.5
    assert abs(mean - exact) < 4.5 * se, (float(mean), float(exact), float(se))
    # the tolerance is tight enough to reject the usual mistakes
    jf, jg = _jacobians(f, g, x0[0])
    without_identity = (jg @ jf).square().sum()
    assert abs(without_identity - exact) > 20 * se
    assert abs(2 * exact - exact) > 20 * se and abs(exact.sqrt() - exact) > 20 * se


def test_several_probes_per_row_average_them():
    """probes=K (structured and repeated-row paths) has the same mean and K times less variance."""
    d = 3
    x0 = torch.randn(1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for f, g in [(_resnet(d, 4), _resnet(d, 5)), (_mlp(d, 4, act=nn.Softplus), _mlp(d, 5, act=nn.Softplus))]:
        exact = _exact(f, g, x0[0])
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            values = inverse_defect(f, g, x0.expand(4000, -1), probes=5, generator=gen)
        single = _per_probe(f, g, x0, 4000, "gaussian", seed=2)
        mean, se = values.mean(), values.std() / values.numel() ** 0.5
        assert abs(mean - exact) < 4.5 * se
        ratio = float(single.var() / values.var())
        assert 3.5 < ratio < 7.0, ratio  # 5 averaged probes: variance / 5


@pytest.mark.parametrize("mode", ["gaussian", "rademacher", "sphere"])
def test_zero_for_an_affine_map_and_its_inverse(mode):
    torch.manual_seed(0)
    d = 4
    f = nn.Linear(d, d).double()
    with torch.no_grad():
        f.weight.copy_(torch.randn(d, d, dtype=torch.float64) + 3 * torch.eye(d, dtype=torch.float64))
    g = nn.Linear(d, d).double()
    with torch.no_grad():
        g.weight.copy_(torch.linalg.inv(f.weight))
        g.bias.copy_(-g.weight @ f.bias)
    x = torch.randn(16, d, dtype=torch.float64)
    torch.testing.assert_close(g(f(x)), x)
    defect = inverse_defect(f, g, x, probes=3, mode=mode).detach()
    assert defect.shape == (16,) and float(defect.max()) < 1e-20
    # and a decoder off by a factor (1 + eps) has the defect eps^2 D exactly with orthogonal probes
    scaled = inverse_defect(f, lambda z: 1.1 * g(z), x, probes=d, mode="sphere").detach()
    torch.testing.assert_close(scaled, torch.full((16,), 0.01 * d, dtype=torch.float64))


def test_on_a_subspace_the_identity_is_that_of_the_subspace():
    n, dims = 3, 2
    q = mean_free_basis(n, dims).double()
    d = n * dims
    f = _mlp(d, 6)
    g0 = _mlp(d, 7)
    centre = torch.eye(d, dtype=torch.float64) - q @ q.T  # projector onto the centre-of-mass directions

    def g(z):  # a change only along the centre of mass, which the subspace does not see
        return g0(z) + 5.0 * z @ centre

    x0 = torch.randn(1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    exact = _exact(f, g, x0[0], q)
    values = _per_probe(f, g, x0, 20_000, "gaussian", basis=q)
    mean, se = values.mean(), values.std() / values.numel() ** 0.5
    assert abs(mean - exact) < 4.5 * se
    full = _exact(f, g, x0[0])
    assert abs(full - exact) > 20 * se  # the full-space defect is something else

    # an exact inverse on the subspace that differs along the centre of mass: zero defect there
    lin = nn.Linear(d, d, bias=False).double()
    with torch.no_grad():
        inner = torch.randn(d - dims, d - dims, dtype=torch.float64)
        lin.weight.copy_(torch.eye(d, dtype=torch.float64) + 0.3 * q @ inner @ q.T)
    inv = torch.linalg.inv(lin.weight.detach())
    x = torch.randn(8, d, dtype=torch.float64)
    defect = inverse_defect(lin, lambda z: z @ inv.T + 2.0 * z @ centre, x, probes=2, basis=q).detach()
    assert float(defect.max()) < 1e-20


def test_differentiable_in_the_parameters():
    f, g = _resnet(2, 0), _resnet(2, 1)
    defect = inverse_defect(f, g, torch.randn(8, 2, dtype=torch.float64), probes=2).mean()
    defect.backward()
    for net in (f, g):  # biases of the last layers do not move a tangent: no gradient there
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(q).all() for q in grads)
        assert any(q.abs().sum() > 0 for q in grads)


def test_bad_input_is_a_clear_error():
    f = nn.Identity()
    x = torch.randn(4, 3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="probes must be a positive integer"):
            inverse_defect(f, f, x, probes=bad)
    with pytest.raises(ValueError, match="basis must be"):
        inverse_defect(f, f, x, basis=torch.eye(4))


def test_the_flows_method():
    torch.manual_seed(0)
    flow = ff.FreeFormFlow.resnet(3, condition_dim=2, hidden=16).double()
    x, c = torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    assert float(flow.inverse_defect(x, c, probes=3).abs().max()) == 0.0  # identities at initialisation
    with torch.no_grad():
        for p in flow.decoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    defect = flow.inverse_defect(x, c, probes=3, generator=torch.Generator().manual_seed(0))
    assert defect.shape == (5, 4) and bool((defect > 0).all())
    direct = inverse_defect(
        flow.encoder, flow.decoder, x.reshape(20, 3), c.expand(20, 2), probes=3,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(defect.reshape(20), direct)

    particles = ff.FreeFormFlow.egnn(3, 2, hidden=8, layers=1).double()
    x = particles.sample(4)
    assert float(particles.inverse_defect(x, probes=2).abs().max()) < 1e-20  # on the subspace


def test_a_tiny_run_logs_the_validation_inverse_defect(tmp_path):
    from freeflows.experiments.config import load_config
    from freeflows.runner.train import train

    cfg = load_config("tiny", ["trainer.progress_bar=false", "trainer.plot=false", "trainer.max_steps=16"])
    run = train(cfg, tmp_path / "r")
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    values = [float(r[2]) for r in rows if r[1] == "val/inverse_defect"]
    assert values, "val/inverse_defect was not logged"
    assert all(v >= 0 and v == v and v < 1e3 for v in values)
    assert max(values) > 0  # training moved the decoder away from the encoder's exact inverse
    per_dim = [float(r[2]) for r in rows if r[1] == "val/inverse_defect_per_dim"]
    assert len(per_dim) == len(values)  # the tiny preset's data is 2-D
    assert all(abs(a - b / 2) <= 1e-6 * (1 + b) for a, b in zip(per_dim, values, strict=True))


def test_density_dimension_is_the_subspace_dimension_of_a_mean_free_latent():
    import freeflows as ff
    from freeflows.eval.metrics import density_dimension

    assert density_dimension(ff.FreeFormFlow.resnet(3, hidden=8), (3,)) == 3
    particles = ff.FreeFormFlow.egnn(4, 2, hidden=8, layers=1)
    assert density_dimension(particles, (4, 2)) == 6  # (4 - 1) * 2
