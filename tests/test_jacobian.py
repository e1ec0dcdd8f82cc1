"""The exact Jacobian utilities against explicit per-row jacrev and slogdet."""

import pytest
import torch
from torch.func import jacrev

from freeflows.jacobian import batch_jacobian, log_abs_det_jacobian


def _net():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_batch_jacobian_matches_rowwise_jacrev(mode):
    net = _net()
    x = torch.randn(7, 3, dtype=torch.float64)
    jac = batch_jacobian(net, x, mode=mode)
    ref = torch.stack([jacrev(net)(xi) for xi in x])
    torch.testing.assert_close(jac, ref, rtol=1e-12, atol=1e-12)
    ld = log_abs_det_jacobian(net, x, mode=mode)
    torch.testing.assert_close(ld, torch.linalg.slogdet(ref).logabsdet, rtol=1e-12, atol=1e-12)


def test_chunked_equals_unchunked():
    net = _net()
    x = torch.randn(11, 3, dtype=torch.float64)
    full = log_abs_det_jacobian(net, x)
    for chunk in (1, 3, 5):
        torch.testing.assert_close(log_abs_det_jacobian(net, x, chunk_size=chunk), full, rtol=0, atol=1e-14)


def test_with_condition():
    lin = torch.nn.Linear(5, 3).double()
    x, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    jac = batch_jacobian(lambda x_, c_: lin(torch.cat([x_, c_], -1)), x, c)
    torch.testing.assert_close(jac, lin.weight[:, :3].expand(4, 3, 3))


def test_bad_mode_and_chunk():
    with pytest.raises(ValueError, match="unknown Jacobian mode"):
        batch_jacobian(torch.nn.Identity(), torch.randn(2, 2), mode="sideways")
    with pytest.raises(ValueError, match="chunk_size"):
        batch_jacobian(torch.nn.Identity(), torch.randn(2, 2), chunk_size=0)


def _resnet(condition_dim=0):
    from freeflows import ResNet

    torch.manual_seed(2)
    net = ResNet(4, 8, condition_dim=condition_dim).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return net


@pytest.mark.parametrize("conditional", [False, True])
def test_structured_auto_mode_matches_torch_func_with_gradients(conditional):
    """mode="auto" with the module uses the structured tangents (freeflows.tangents); its
    Jacobian and the parameter gradient of its log-determinant equal the vmap(jacrev) ones."""
    net = _resnet(2 if conditional else 0)
    x = torch.randn(6, 4, dtype=torch.float64)
    c = torch.randn(6, 2, dtype=torch.float64) if conditional else None
    params = list(net.parameters())
    out = {}
    for mode, module in (("auto", net), ("reverse", None)):
        ld = log_abs_det_jacobian(net, x, c, mode=mode, module=module, chunk_size=4)
        grads = torch.autograd.grad(ld.sum(), params, allow_unused=True)
        out[mode] = (batch_jacobian(net, x, c, mode=mode, module=module), ld, grads)
    torch.testing.assert_close(out["auto"][0], out["reverse"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["auto"][1], out["reverse"][1], rtol=1e-12, atol=1e-12)
    for a, b in zip(out["auto"][2], out["reverse"][2], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_structured_tangents_concatenated_condition_and_fallback():
    from freeflows.tangents import Unsupported, dual_forward, jacobian

    seq = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3)
    ).double()
    x, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    ref = torch.stack(
        [jacrev(lambda xi, ci=ci: seq(torch.cat([xi, ci])))(xi) for xi, ci in zip(x, c, strict=True)]
    )
    torch.testing.assert_close(jacobian(seq, x, c, takes_c=False), ref, rtol=1e-12, atol=1e-12)
    # any other module goes through forward AD for one tangent, and is refused for several
    elu = torch.nn.ELU()
    t = torch.randn(4, 3, dtype=torch.float64)
    y, ty = dual_forward(elu, x, t)
    torch.testing.assert_close(ty, torch.func.jvp(elu, (x,), (t,))[1])
    with pytest.raises(Unsupported):
        jacobian(elu, x)
