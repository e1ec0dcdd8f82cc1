"""Claims of issue "freeflows core" about FreeFormFlow: unbiased gradients, bias growth, exact
log_prob, bad input, light import. Learning to the right density is in test_freeform_learning.py."""

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import jacrev

from freeflows import FreeFormFlow, ResNet, StandardNormal
from freeflows.distributions import LOG_TWO_PI
from freeflows.hutchinson import HUTCHINSON_MODES

D = 3


class Affine(nn.Module):
    """f(x) = A x + b, with an analytic inverse."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = nn.Parameter(
            torch.eye(D, dtype=torch.float64) + 0.4 * torch.randn(D, D, generator=g, dtype=torch.float64)
        )
        self.b = nn.Parameter(0.3 * torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, x):
        return x @ self.a.T + self.b


class AffineInverse(nn.Module):
    """g(z) = A^{-1}(z - b) + eps * M z: the exact inverse of ``f`` when eps = 0."""

    def __init__(self, f: Affine, eps: float = 0.0):
        super().__init__()
        self.f, self.eps = f, eps
        self.m = torch.randn(D, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def forward(self, z):
        # inv + matmul: vmap(jacfwd(torch.linalg.solve)) gives wrong Jacobians in torch 2.13
        x = (z - self.f.b) @ torch.linalg.inv(self.f.a).T
        return x + self.eps * z @ self.m.T


class SinhMap(nn.Module):
    """Nonlinear invertible f(x) = B sinh(A x + b)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        eye = torch.eye(D, dtype=torch.float64)
        self.a = nn.Parameter(eye + 0.3 * torch.randn(D, D, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(0.2 * torch.randn(D, generator=g, dtype=torch.float64))
        self.bm = nn.Parameter(eye + 0.3 * torch.randn(D, D, generator=g, dtype=torch.float64))

    def forward(self, x):
        return torch.sinh(x @ self.a.T + self.b) @ self.bm.T


class SinhInverse(nn.Module):
    def __init__(self, f: SinhMap):
        super().__init__()
        self.f = f

    def forward(self, z):
        u = torch.asinh(z @ torch.linalg.inv(self.f.bm).T)
        return (u - self.f.b) @ torch.linalg.inv(self.f.a).T


def _exact_log_prob(f, x):
    jac = torch.stack([jacrev(f)(xi.unsqueeze(0)).reshape(D, D) for xi in x])
    z = f(x)
    return -0.5 * z.square().sum(1) - 0.5 * D * LOG_TWO_PI + torch.linalg.slogdet(jac).logabsdet


def _flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _make(kind, mode, eps=0.0, beta=1.0, samples=1, surrogate="vjp"):
    f = Affine() if kind == "affine" else SinhMap()
    g = AffineInverse(f, eps) if kind == "affine" else SinhInverse(f)
    return FreeFormFlow(
        f,
        g,
        StandardNormal(D).double(),
        beta=beta,
        hutchinson=mode,
        hutchinson_samples=samples,
        surrogate=surrogate,
    )


X = torch.randn(4, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.7


# Every probe distribution with the default surrogate ("vjp"), and a covering subset with "jvp",
# to keep the runtime modest; K = 2 checks the averaging over probes in both modes.
UNBIASED_CASES = [(kind, mode, "vjp", 1) for kind in ("affine", "sinh") for mode in HUTCHINSON_MODES] + [
    ("sinh", "gaussian", "jvp", 1),
    ("affine", "rademacher", "jvp", 1),
    ("sinh", "sphere", "jvp", 2),
    ("sinh", "rademacher", "vjp", 2),
]


@pytest.mark.parametrize(("kind", "mode", "surrogate", "samples"), UNBIASED_CASES)
def test_surrogate_gradient_is_unbiased(kind, mode, surrogate, samples):
    """With g = f^{-1}, E_v[grad of the loss] equals the gradient of the exact NLL, for both ways
    of computing the surrogate (J_g v forward + v^T J_f reverse, or v^T J_g reverse + J_f v forward)."""
    torch.manual_seed(0)
    model = _make(kind, mode, surrogate=surrogate, samples=samples)
    params = list(model.encoder.parameters())
    exact = _flat_grad(-_exact_log_prob(model.encoder, X).mean(), params)
    draws = torch.stack([_flat_grad(model.loss(X).value, params) for _ in range(1500)])
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    z = (mean - exact).abs() / (se + 1e-12)
    assert se.max() > 1e-6, "the estimator should be random here"
    assert z.max() < 4.5, f"max z-score {z.max():.2f}"


def test_unbiasedness_check_has_power():
    """The statistical test above has power: a mis-weighted surrogate (doubled) is detected."""
    torch.manual_seed(0)
    model = _make("sinh", "gaussian", samples=2)
    params = list(model.encoder.parameters())
    exact = _flat_grad(-_exact_log_prob(model.encoder, X).mean(), params)
    # Doubling the surrogate's weight mimics a mis-normalised estimator.
    draws = []
    for _ in range(300):
        loss = model.loss(X)
        nll_grad = _flat_grad(loss.value, params)
        draws.append(2 * nll_grad - _flat_grad(model.latent.log_prob(model.encode(X)).neg().mean(), params))
    draws = torch.stack(draws)
    z = (draws.mean(0) - exact).abs() / (draws.std(0) / draws.shape[0] ** 0.5)
    assert z.max() > 10


def test_bias_grows_with_inverse_error():
    """With a perturbed inverse, the gradient bias grows (about linearly) with ||J_g J_f - I||.

    The sphere mode with K = D orthogonal probes is the exact trace, so every number is exact."""
    errors, biases = [], []
    for eps in (0.0, 0.01, 0.03, 0.1, 0.3):
        model = _make("affine", "sphere", eps=eps, beta=0.0, samples=D)
        params = [model.encoder.a, model.encoder.b]
        exact = _flat_grad(-_exact_log_prob(model.encoder, X).mean(), params)
        biases.append((_flat_grad(model.loss(X).value, params) - exact).norm().item())
        eye = torch.eye(D, dtype=torch.float64)
        j_g = torch.linalg.inv(model.encoder.a) + eps * model.decoder.m
        errors.append((j_g @ model.encoder.a - eye).norm().item())
    assert biases[0] < 1e-10
    assert all(b2 > b1 for b1, b2 in zip(biases, biases[1:], strict=False))
    ratios = [b / e for b, e in zip(biases[1:], errors[1:], strict=True)]
    assert max(ratios) / min(ratios) < 1.5, ratios  # bias ~ proportional to the inverse error


def _resnet_flow(samples, surrogate, conditional=False):
    torch.manual_seed(2)
    cf = 2 if conditional else 0
    enc, dec = ResNet(D, 16, condition_dim=cf).double(), ResNet(D, 16, condition_dim=cf).double()
    for p in list(enc.parameters()) + list(dec.parameters()):
        nn.init.normal_(p, std=0.3)
    return FreeFormFlow(
        enc,
        dec,
        StandardNormal(D).double(),
        hutchinson="sphere",
        hutchinson_samples=samples,
        surrogate=surrogate,
        condition_dim=cf or None,
    )


@pytest.mark.parametrize("kind", ["affine", "resnet", "resnet-conditional"])
@pytest.mark.parametrize("k", [1, D])
def test_surrogate_modes_agree_exactly_with_orthogonal_probes(kind, k):
    """With K = D orthogonal probes both surrogates are the exact trace, so for any g (here not
    f^{-1}) both modes give the same gradient tr(J_g dJ_f), whichever path computes the tangents
    (generic forward AD for the affine maps, the structured one for ResNets, with K tangents per
    row when K > 1); with K = 1 they share the values of the other loss terms."""
    c = torch.randn(X.shape[0], 2, dtype=torch.float64) if kind == "resnet-conditional" else None
    grads = {}
    for surrogate in ("jvp", "vjp"):
        if kind == "affine":
            model = _make("affine", "sphere", eps=0.2, samples=k, surrogate=surrogate)
        else:
            model = _resnet_flow(k, surrogate, conditional=c is not None)
        torch.manual_seed(0)
        loss = model.loss(X, c)
        grads[surrogate] = (loss, _flat_grad(loss.value, list(model.parameters())))
    (loss_j, g_j), (loss_v, g_v) = grads["jvp"], grads["vjp"]
    for key in ("latent_nll", "reconstruction"):
        torch.testing.assert_close(loss_j.parts[key], loss_v.parts[key], rtol=1e-12, atol=1e-12)
    if k == D:
        torch.testing.assert_close(g_j, g_v, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(loss_j.value, loss_v.value, rtol=1e-10, atol=1e-10)


def test_log_prob_is_exact_for_an_exact_inverse():
    model = _make("sinh", "gaussian")
    ref = _exact_log_prob(model.encoder, X)
    torch.testing.assert_close(model.log_prob(X), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.log_prob(X, variant="encoder"), ref, rtol=1e-10, atol=1e-10)


def test_log_prob_of_resnet_flow_matches_explicit_decoder_jacobian_and_chunking():
    torch.manual_seed(0)
    enc, dec = ResNet(D, 16, blocks=2).double(), ResNet(D, 16, blocks=2).double()
    for p in list(enc.parameters()) + list(dec.parameters()):
        nn.init.normal_(p, std=0.3)
    model = FreeFormFlow(enc, dec, StandardNormal(D).double())
    x = torch.randn(9, D, dtype=torch.float64)
    z = enc(x)
    jac = torch.stack([jacrev(dec)(zi.unsqueeze(0)).reshape(D, D) for zi in z])
    ref = -0.5 * z.square().sum(1) - 0.5 * D * LOG_TWO_PI - torch.linalg.slogdet(jac).logabsdet
    full = model.log_prob(x, variant="paper")
    torch.testing.assert_close(full, ref, rtol=1e-10, atol=1e-10)
    for chunk in (1, 2, 4):
        value = model.log_prob(x, variant="paper", chunk_size=chunk)
        torch.testing.assert_close(value, full, rtol=0, atol=1e-13)
    # for a generic pair the encoder value differs: the gap is the inverse-error diagnostic
    assert (model.log_prob(x, variant="encoder") - full).abs().max() > 1e-3


def test_conditions_concatenated_or_passed():
    torch.manual_seed(0)
    concat = FreeFormFlow(nn.Linear(D + 2, D), nn.Linear(D + 2, D), StandardNormal(D), condition_dim=2)
    passed = FreeFormFlow(
        ResNet(D, 8, condition_dim=2),
        ResNet(D, 8, condition_dim=2),
        StandardNormal(D),
        condition_dim=2,
    )
    x, c = torch.randn(5, D), torch.randn(5, 2)
    for m in (concat, passed):
        assert m.loss(x, c).value.isfinite()
        assert m.log_prob(x, c).shape == (5,)
        assert m.sample(7, c[0]).shape == (7, D)
        assert m.sample(2, c).shape == (2, 5, D)
    # the condition matters for the concatenating model
    assert not torch.allclose(concat.log_prob(x, c), concat.log_prob(x, c + 1))


def test_bad_input_is_a_value_error():
    model = FreeFormFlow(ResNet(D), ResNet(D), StandardNormal(D))
    x = torch.randn(4, D)
    for bad, match in [
        (x.clone().index_fill_(0, torch.tensor([1]), float("nan")), "NaN"),
        (x.clone().index_fill_(0, torch.tensor([2]), float("inf")), "inf"),
        (torch.randn(4, D + 1), "shape"),
        (torch.randn(D - 1), "shape"),
        (x.double(), "dtype torch.float64 but the model is torch.float32"),
    ]:
        for call in (model.loss, model.log_prob):
            with pytest.raises(ValueError, match=match):
                call(bad)
    with pytest.raises(ValueError, match="unconditional"):
        model.loss(x, torch.randn(4, 2))
    cond = FreeFormFlow(
        ResNet(D, condition_dim=2), ResNet(D, condition_dim=2), StandardNormal(D), condition_dim=2
    )
    with pytest.raises(ValueError, match="conditional"):
        cond.loss(x)
    with pytest.raises(ValueError, match="does not broadcast"):
        cond.loss(x, torch.randn(3, 2))
    with pytest.raises(ValueError, match="c has dtype torch.float64"):
        cond.log_prob(x, torch.randn(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected"):
        cond.sample(3, torch.randn(5))
    with pytest.raises(ValueError, match="beta"):
        FreeFormFlow(ResNet(D), ResNet(D), StandardNormal(D), beta=-1.0)
    with pytest.raises(ValueError, match="unknown Hutchinson mode"):
        FreeFormFlow(ResNet(D), ResNet(D), StandardNormal(D), hutchinson="uniform")
    with pytest.raises(ValueError, match="unknown surrogate"):
        FreeFormFlow(ResNet(D), ResNet(D), StandardNormal(D), surrogate="both")
    with pytest.raises(ValueError, match="exceeds the dimension"):
        FreeFormFlow(ResNet(D), ResNet(D), StandardNormal(D), hutchinson="sphere", hutchinson_samples=D + 1)
    with pytest.raises(ValueError, match="keep the shape"):
        FreeFormFlow(nn.Linear(D, D + 1), ResNet(D), StandardNormal(D)).loss(x)


def test_condition_size_is_declared_once():
    """A network built for another condition size is an error at construction; without
    condition_dim the size the networks declare is taken."""
    with pytest.raises(ValueError, match="condition_dim=3, but the encoder network was built for 2"):
        FreeFormFlow(ResNet(D, condition_dim=2), ResNet(D), StandardNormal(D), condition_dim=3)
    with pytest.raises(ValueError, match="the decoder network was built for 0"):
        FreeFormFlow(ResNet(D, condition_dim=2), ResNet(D), StandardNormal(D), condition_dim=2)
    with pytest.raises(ValueError, match="different sizes"):
        FreeFormFlow(ResNet(D, condition_dim=2), ResNet(D), StandardNormal(D))
    two = ResNet(D, condition_dim=2)
    derived = FreeFormFlow(two, ResNet(D, condition_dim=2), StandardNormal(D))
    assert derived.condition_dim == 2
    assert FreeFormFlow.resnet(D, 2).condition_dim == 2
    assert FreeFormFlow.resnet(D).condition_dim is None


def test_resnet_constructor_matches_the_networks_it_names():
    """``FreeFormFlow.resnet(features, ...)`` builds ResNet encoder and decoder of the given sizes,
    a standard normal latent, and passes the flow's options on."""
    flow = FreeFormFlow.resnet(D, 2, hidden=8, depth=1, blocks=4, beta=3.0, sample_refine_steps=2)
    for net in (flow.encoder, flow.decoder):
        assert isinstance(net, ResNet) and len(net.blocks) == 4 and net.condition_dim == 2
        assert net.blocks[0].branch[0].out_features == 8 and len(net.blocks[0].branch) == 3
    assert isinstance(flow.latent, StandardNormal) and flow.event_shape == (D,)
    assert (flow.beta, flow.sample_refine_steps) == (3.0, 2)
    with pytest.raises(ValueError, match="features"):
        FreeFormFlow.resnet(0)


def test_import_is_light():
    code = (
        "import sys, freeflows, freeflows.data.toy\n"
        "heavy = ('lightning', 'pytorch_lightning', 'matplotlib', 'sbibm', 'yaml')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
