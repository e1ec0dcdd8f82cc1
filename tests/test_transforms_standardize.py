"""The z-score bijection (freeflows.transforms.standardize): log-determinant against autograd,
whitening and round trip, constant features, shapes. The model wrapper it serves,
freeflows.standardized.StandardizedModel, is tested with the user's files (test_data_user.py)."""

from __future__ import annotations

import pytest
import torch

from freeflows.transforms.standardize import Standardizer


def _fitted(dim: int = 4) -> tuple[Standardizer, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    v = (
        torch.randn(200, dim, generator=g, dtype=torch.float64)
        * torch.tensor([0.1, 3.0, 1.0, 50.0][:dim]).double()
    )
    v = v + torch.tensor([5.0, -2.0, 0.0, 100.0][:dim]).double()
    return Standardizer.fit(v), v


def test_standardizer_log_abs_det_matches_autograd_jacobian():
    standardizer, v = _fitted()
    jac = torch.func.jacrev(lambda row: standardizer(row.unsqueeze(0))[0].squeeze(0))(v[0])
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign.item() == 1.0
    torch.testing.assert_close(standardizer.log_abs_det(), logabsdet, rtol=0, atol=1e-12)
    # The scale is really used: an unscaled map would have log-det 0.
    assert abs(logabsdet.item()) > 1.0


def test_standardizer_whitens_training_data_and_inverts():
    standardizer, v = _fitted()
    u, log_det = standardizer(v)
    torch.testing.assert_close(u.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(u.std(0), torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(standardizer.inverse(u), v, atol=1e-10, rtol=0)


def test_standardizer_floors_constant_features():
    v = torch.stack([torch.randn(50), torch.full((50,), 3.0)], dim=1)
    standardizer = Standardizer.fit(v)
    assert standardizer.std[1].item() == 1.0
    u, log_det = standardizer(v)
    assert torch.isfinite(u).all() and u[:, 1].abs().max().item() == 0.0


def test_forward_log_det_is_per_row_and_bad_shapes_are_errors():
    standardizer, v = _fitted()
    u, log_det = standardizer(v.reshape(50, 4, 4))
    assert u.shape == (50, 4, 4) and log_det.shape == (50, 4)
    assert torch.equal(log_det, standardizer.log_abs_det().expand(50, 4))
    with pytest.raises(ValueError, match="Standardizer of 4 features"):
        standardizer(torch.zeros(3, 5))
