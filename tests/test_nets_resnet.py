"""The residual MLP is exactly the identity at initialisation, and it trains."""

import pytest
import torch

from freeflows import ResNet


def test_identity_at_init():
    net = ResNet(5, hidden=32, depth=3, blocks=4)
    x = torch.randn(10, 5)
    assert torch.equal(net(x), x)
    cnet = ResNet(5, hidden=32, condition_dim=2)
    assert torch.equal(cnet(x, torch.randn(10, 2)), x)


def test_identity_init_has_gradients_and_trains():
    torch.manual_seed(0)
    net = ResNet(2, hidden=64, depth=2, blocks=2)
    x = torch.randn(512, 2)
    target = torch.stack([x[:, 0] + 0.5 * x[:, 1].sin(), x[:, 1] * 0.7], dim=1)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    first = None
    for _ in range(300):
        loss = (net(x) - target).square().mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_bad_inputs():
    net = ResNet(3)
    with pytest.raises(ValueError, match="expects 3 features"):
        net(torch.randn(2, 4))
    with pytest.raises(ValueError, match="condition_dim"):
        net(torch.randn(2, 3), torch.randn(2, 1))
