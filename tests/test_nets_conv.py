"""The convolutional residual network and free-form flows on image-shaped events."""

import math

import pytest
import torch

import freeflows as ff
from freeflows.eval.mass import density_mass
from freeflows.nets import ConvResidualBlock, ConvResNet


def perturbed(net: ConvResNet, std: float = 0.05, seed: int = 0) -> ConvResNet:
    """``net`` with its zero-initialised last convolutions set to small random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in net.blocks:
            last = block.branch[-1]
            last.weight.copy_(std * torch.randn(last.weight.shape, generator=g))
            last.bias.copy_(std * torch.randn(last.bias.shape, generator=g))
    return net


@pytest.mark.parametrize("condition_dim", [0, 3])
def test_shape_and_identity_at_init(condition_dim):
    net = ConvResNet(2, hidden=8, blocks=3, condition_dim=condition_dim)
    x = torch.randn(4, 2, 5, 7)
    c = torch.randn(4, condition_dim) if condition_dim else None
    y = net(x, c)
    assert y.shape == x.shape
    assert torch.equal(y, x)


def test_gradient_reaches_every_block_and_training_leaves_the_identity():
    torch.manual_seed(0)
    net = ConvResNet(1, hidden=8, blocks=2, condition_dim=2)
    x, c = torch.randn(6, 1, 8, 8), torch.randn(6, 2)
    target = torch.randn(6, 1, 8, 8)
    (net(x, c) - target).square().mean().backward()
    for block in net.blocks:
        # at initialisation only the zero-initialised last layer has a gradient (the branch is cut
        # at zero weights), and it must not vanish
        assert float(block.branch[-1].weight.grad.abs().sum()) > 0
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    (net(x, c) - target).square().mean().backward()
    for block in net.blocks:  # after one step every layer has a gradient
        assert float(block.branch[0].weight.grad.abs().sum()) > 0
    assert not torch.equal(net(x, c), x)


def test_condition_changes_the_output():
    net = perturbed(ConvResNet(1, hidden=8, blocks=2, condition_dim=2))
    x = torch.randn(3, 1, 4, 4)
    assert not torch.allclose(net(x, torch.zeros(3, 2)), net(x, torch.ones(3, 2)))


def test_block_is_identity_and_keeps_size_with_larger_kernels():
    block = ConvResidualBlock(3, hidden=4, depth=3, kernel_size=5)
    h = torch.randn(2, 3, 6, 6)
    assert torch.equal(block(h), h)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channels": 0}, "channels must be a positive integer"),
        ({"channels": 1, "hidden": 0}, "hidden must be a positive integer"),
        ({"channels": 1, "blocks": 0}, "blocks must be a positive integer"),
        ({"channels": 1, "kernel_size": 4}, "kernel_size must be a positive odd integer"),
        ({"channels": 1, "depth": 0}, "depth must be >= 1"),
        ({"channels": 1, "condition_dim": -1}, "condition_dim must be an integer >= 0"),
    ],
)
def test_bad_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvResNet(**kwargs)


def test_bad_inputs():
    net = ConvResNet(2, hidden=4, blocks=1)
    with pytest.raises(ValueError, match="expects images"):
        net(torch.randn(3, 8))
    with pytest.raises(ValueError, match="c is given"):
        net(torch.randn(3, 2, 4, 4), torch.randn(3, 1))
    conditional = ConvResNet(2, hidden=4, blocks=1, condition_dim=2)
    with pytest.raises(ValueError, match="c is missing"):
        conditional(torch.randn(3, 2, 4, 4))
    with pytest.raises(ValueError, match="expects conditions"):
        conditional(torch.randn(3, 2, 4, 4), torch.randn(3, 5))


def image_flow(shape=(1, 3, 3), seed=0, condition_dim=0) -> ff.FreeFormFlow:
    torch.manual_seed(seed)
    nets = [
        perturbed(ConvResNet(shape[0], hidden=6, blocks=2, condition_dim=condition_dim), seed=seed + k)
        for k in range(2)
    ]
    return ff.FreeFormFlow(nets[0], nets[1], ff.StandardNormal(*shape), beta=10.0).double()


def full_jacobian_log_prob(flow: ff.FreeFormFlow, z: torch.Tensor, c=None) -> torch.Tensor:
    """log p_Z(z) - log|det J_g(z)| with J_g from torch.func.jacrev and slogdet."""
    d = z[0].numel()

    def g(zz, cc):
        return flow.decoder(zz[None], None if cc is None else cc[None])[0]

    jac = torch.func.vmap(torch.func.jacrev(g), in_dims=(0, None if c is None else 0))(z, c)
    log_det = torch.linalg.slogdet(jac.reshape(z.shape[0], d, d)).logabsdet
    return flow.latent.log_prob(z) - log_det


@pytest.mark.parametrize("condition_dim", [0, 2])
def test_free_form_density_on_images_matches_full_jacobians(condition_dim):
    flow = image_flow((1, 4, 4), condition_dim=condition_dim)
    x = 0.8 * torch.randn(5, 1, 4, 4, dtype=torch.float64)
    c = torch.randn(5, condition_dim, dtype=torch.float64) if condition_dim else None
    log_q = flow.log_prob(x, c)
    solve = flow.invert_decoder(x, c)
    assert bool(solve.converged.all())
    assert torch.allclose(flow.decode(solve.z, c), x, atol=1e-8)
    torch.testing.assert_close(log_q, full_jacobian_log_prob(flow, solve.z, c), atol=1e-8, rtol=0)
    # the paper's value is evaluated at f(x), which differs from z* when g does not invert f
    paper = flow.log_prob(x, c, variant="paper")
    z = flow.encode(x, c)
    torch.testing.assert_close(paper, full_jacobian_log_prob(flow, z, c), atol=1e-8, rtol=0)
    assert not torch.allclose(paper, log_q, atol=1e-3)
    c0 = None if c is None else c[0]
    draws, log_q_draws = flow.sample_and_log_prob(4, c0)
    assert draws.shape == (4, 1, 4, 4)
    torch.testing.assert_close(log_q_draws, flow.log_prob(draws, c0), atol=1e-6, rtol=0)


def test_free_form_loss_on_images_trains():
    flow = image_flow((1, 4, 4)).float()
    x = 0.5 * torch.randn(32, 1, 4, 4) + 0.3
    loss = flow.loss(x)
    loss.value.backward()
    grads = [p.grad for p in flow.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert float(sum(g.abs().sum() for g in grads)) > 0


def test_free_form_density_on_images_integrates_to_one():
    """Importance-sampling mass of the decoder density of a perturbed 1x2x2 conv flow: within
    four standard errors of 1."""
    flow = image_flow((1, 2, 2), seed=1)
    with torch.no_grad():
        data = flow.sample(2000)
    mass = density_mass(lambda x: flow.log_prob(x), data, evaluations=4000, seed=0)
    assert mass.unsolved == 0
    assert math.isfinite(mass.stderr) and mass.stderr < 0.05
    assert abs(mass.mass - 1) < 4 * mass.stderr + 1e-3
