"""Exact transforms: round trips, log-determinants against autograd Jacobians, masks, shapes.

Everything runs in float64 with parameters perturbed away from their (often zero) initial values,
so that identity-at-initialisation layers cannot make a check vacuous.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import jacrev

from freeflows.jacobian import batch_jacobian
from freeflows.transforms import (
    MADE,
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ComposedTransform,
    DiagonalScaling,
    ImageAffineCoupling,
    InverseAutoregressive,
    InvertibleConv1x1,
    InvertibleLinear,
    MaskedAutoregressive,
    MultiScale,
    Permutation,
    Planar,
    Reverse,
    Squeeze,
    half_mask,
)

B, C = 6, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def perturb(module: nn.Module, scale: float = 0.2, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def prepared(make, shape: tuple[int, ...], conditional: bool, seed: int = 0):
    """A float64 transform with data-dependent layers initialised and parameters perturbed, with
    an input batch and a condition (or None)."""
    torch.manual_seed(seed)
    t = make().double()
    x = torch.randn(B, *shape, dtype=torch.float64) * 1.5 + 0.3
    c = torch.randn(B, C, dtype=torch.float64) if conditional else None
    with torch.no_grad():
        t(x, c)  # ActNorm's data-dependent initialisation
    perturb(t, seed=seed)
    return t, x, c


def autograd_jacobian(fn, x: Tensor) -> Tensor:
    """Per-row Jacobians ``[B, D, D]`` by plain reverse-mode autograd (rows are independent, so
    the Jacobian of the sum over rows holds each row's Jacobian); no vmap, so it also works for
    the planar solver's data-dependent loop."""
    rows = x.shape[0]
    jac = torch.autograd.functional.jacobian(lambda v: fn(v).reshape(rows, -1).sum(0), x)
    return jac.reshape(-1, rows, x[0].numel()).permute(1, 0, 2)


CASES = {
    "additive-odd": (lambda: AdditiveCoupling(5, condition_dim=C), (5,), True),
    "affine-odd": (lambda: AffineCoupling(5, half_mask(5, flip=True)), (5,), False),
    "affine-custom-mask": (
        lambda: AffineCoupling(4, torch.tensor([True, False, False, True]), condition_dim=C),
        (4,),
        True,
    ),
    "affine-no-clamp": (lambda: AffineCoupling(3, clamp=None), (3,), False),
    "diagonal-scaling": (lambda: DiagonalScaling(4), (4,), False),
    "permutation": (lambda: Permutation(torch.tensor([2, 0, 3, 1])), (4,), False),
    "reverse": (lambda: Reverse(3), (3,), False),
    "actnorm-vector": (lambda: ActNorm(4), (4,), False),
    "actnorm-image": (lambda: ActNorm(3), (3, 4, 4), False),
    "lu-linear": (lambda: InvertibleLinear(5), (5,), False),
    "lu-conv1x1": (lambda: InvertibleConv1x1(3), (3, 2, 2), False),
    "squeeze": (lambda: Squeeze(), (2, 4, 4), False),
    "image-coupling": (lambda: ImageAffineCoupling(3, hidden=8, condition_dim=C), (3, 2, 2), True),
    "multiscale": (
        lambda: MultiScale((1, 4, 4), levels=2, steps=2, hidden=8, condition_dim=C),
        (1, 4, 4),
        True,
    ),
    "maf-layer": (lambda: MaskedAutoregressive(4, 16, 2, C, torch.tensor([2, 0, 3, 1])), (4,), True),
    "iaf-layer": (lambda: InverseAutoregressive(4, 16, 2, C, torch.tensor([1, 3, 0, 2])), (4,), True),
    "made-1d": (lambda: MaskedAutoregressive(1, 8, 1, C), (1,), True),
    "planar": (lambda: Planar(3, condition_dim=C), (3,), True),
    "planar-1d": (lambda: Planar(1), (1,), False),
    "composed": (
        lambda: ComposedTransform(AffineCoupling(3), Reverse(3), ActNorm(3), InvertibleLinear(3), Planar(3)),
        (3,),
        False,
    ),
}
NEEDS_SOLVER = {"planar", "planar-1d", "composed"}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip(name):
    make, shape, conditional = CASES[name]
    t, x, c = prepared(make, shape, conditional)
    z, log_det = t(x, c)
    assert z.shape[0] == B and z.numel() == x.numel() and log_det.shape == (B,)
    assert torch.isfinite(z).all() and torch.isfinite(log_det).all()
    assert torch.allclose(t.inverse(z, c), x, atol=1e-9, rtol=0)
    # and the other way round: forward(inverse(z)) == z
    z2 = torch.randn_like(z)
    assert torch.allclose(t(t.inverse(z2, c), c)[0], z2, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_log_det_matches_jacobian(name):
    make, shape, conditional = CASES[name]
    t, x, c = prepared(make, shape, conditional)
    z, log_det = t(x, c)
    if name in NEEDS_SOLVER:
        # Jacobian of the numerical inverse by autograd: this also checks its implicit gradients
        jac = autograd_jacobian(lambda v: t(v, c)[0], x)
    else:
        jac = batch_jacobian(lambda v, cc=None: t(v, cc)[0], x, c, mode="reverse")
    expected = torch.linalg.slogdet(jac).logabsdet
    assert torch.allclose(log_det, expected, atol=1e-8, rtol=1e-8), (log_det, expected)
    # the inverse's Jacobian at z has the opposite log-determinant
    jac_inv = batch_jacobian(lambda v, cc=None: t.inverse(v, cc), z, c, mode="reverse")
    assert torch.allclose(-torch.linalg.slogdet(jac_inv).logabsdet, log_det, atol=1e-8, rtol=1e-8)


def test_log_det_test_can_fail():
    """The Jacobian comparison above detects a wrong log-determinant."""
    t, x, _ = prepared(lambda: AffineCoupling(4), (4,), False)
    jac = batch_jacobian(lambda v: t(v)[0], x)
    _, log_det = t(x)
    assert not torch.allclose(0.5 * log_det, torch.linalg.slogdet(jac).logabsdet, atol=1e-8)


@pytest.mark.parametrize("order", [None, [3, 0, 4, 1, 2]])
@pytest.mark.parametrize("layers", [1, 3])
def test_made_jacobian_is_strictly_triangular(order, layers):
    torch.manual_seed(1)
    d, p = 5, 2
    made = perturb(MADE(d, p, hidden=12, layers=layers, condition_dim=C, order=order).double())
    x = torch.randn(d, dtype=torch.float64)
    c = torch.randn(C, dtype=torch.float64)
    jac = jacrev(lambda v: made(v[None], c[None])[0])(x)  # [P, D, D]: d out[p, i] / d x[j]
    assert jac.shape == (p, d, d)
    position = torch.arange(d) if order is None else torch.tensor(order)
    sort = torch.argsort(position)  # features in autoregressive order
    ordered = jac[:, sort][:, :, sort]
    allowed = torch.ones(d, d).tril(-1).bool()
    assert (ordered[:, ~allowed] == 0).all()  # exactly zero on and above the diagonal
    assert (ordered[:, allowed].abs() > 1e-8).all()  # every allowed dependence is present
    # outputs depend on the condition
    jc = jacrev(lambda cc: made(x[None], cc[None])[0])(c)
    assert (jc.abs() > 0).any()


def test_odd_features_split_sizes():
    t = AffineCoupling(5)
    assert t.index_a.numel() == 2 and t.index_b.numel() == 3
    t = AffineCoupling(5, half_mask(5, flip=True))
    assert t.index_a.numel() == 3 and t.index_b.numel() == 2


def test_bad_masks():
    with pytest.raises(ValueError, match="mask"):
        AffineCoupling(5, torch.tensor([True, False, True, False]))
    with pytest.raises(ValueError, match="mask"):
        AdditiveCoupling(3, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2"):
        half_mask(1)
    with pytest.raises(ValueError, match="permutation"):
        Permutation(torch.tensor([0, 0, 1]))


def test_wrong_input_shapes():
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        AffineCoupling(4)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="images"):
        InvertibleConv1x1(3)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="images"):
        ImageAffineCoupling(4)(torch.randn(4, 4))
    with pytest.raises(ValueError, match="images"):
        MultiScale((1, 4, 4), levels=1, steps=1)(torch.randn(2, 16))
    with pytest.raises(ValueError, match="even"):
        Squeeze()(torch.randn(2, 1, 3, 4))
    with pytest.raises(ValueError, match="divisible"):
        MultiScale((1, 6, 6), levels=2)
    with pytest.raises(ValueError, match="at least 2 channels"):
        ImageAffineCoupling(1)


def test_actnorm_initialisation_and_constant_feature():
    torch.manual_seed(0)
    x = torch.randn(64, 3) * torch.tensor([2.0, 0.5, 1.0]) + torch.tensor([1.0, -2.0, 0.0])
    x[:, 2] = 4.0  # a constant feature
    norm = ActNorm(3)
    z, log_det = norm(x)
    assert bool(norm.initialized)
    assert torch.isfinite(z).all() and torch.isfinite(log_det).all()
    assert torch.allclose(z[:, :2].mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(z[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-4)
    assert torch.allclose(z[:, 2], torch.zeros(64))
    assert torch.allclose(norm.inverse(z), x, atol=1e-4)
    # a second batch does not re-initialise
    loc = norm.loc.detach().clone()
    norm(torch.randn(8, 3))
    assert torch.equal(norm.loc.detach(), loc)
    # images: per-channel statistics over batch and pixels, log-det scaled by H*W
    img = torch.randn(16, 2, 3, 3) * 3 + 1
    norm = ActNorm(2)
    z, log_det = norm(img)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(log_det, 9 * norm.log_scale.sum().expand(16))


def test_lu_linear_weight_and_log_det():
    torch.manual_seed(0)
    lin = perturb(InvertibleLinear(6).double())
    w = lin.weight()
    lower, upper = lin.factors()
    assert torch.equal(torch.diagonal(lower), torch.ones(6, dtype=torch.float64))
    assert torch.equal(lower.triu(1), torch.zeros_like(lower))
    assert torch.equal(upper.tril(-1), torch.zeros_like(upper))
    assert torch.allclose(lin.log_abs_diag.sum(), torch.linalg.slogdet(w).logabsdet, atol=1e-12)
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.allclose(lin(x)[0], x @ w.T)


def test_squeeze_layout():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    z, _ = Squeeze()(x)
    assert z.shape == (1, 4, 2, 2)
    assert z[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]  # the top-left 2x2 block
