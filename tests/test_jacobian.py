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
