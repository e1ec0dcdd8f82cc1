"""Prior-support bijections (``freeflows.transforms.support``) and the ``unbounded`` SBI data sets."""

from __future__ import annotations

import pytest
import torch

from freeflows.transforms.support import BoxLogit, PositiveLog


def _box() -> tuple[BoxLogit, torch.Tensor]:
    low = torch.tensor([-1.0, -10.0, 0.0], dtype=torch.float64)
    high = torch.tensor([1.0, 10.0, 0.01], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    theta = low + (high - low) * torch.rand(64, 3, generator=g, dtype=torch.float64).clamp(0.01, 0.99)
    return BoxLogit(low, high), theta


def _positive() -> tuple[PositiveLog, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return PositiveLog(4), torch.exp(torch.randn(64, 4, generator=g, dtype=torch.float64) * 2.0)


@pytest.mark.parametrize("make", [_box, _positive], ids=["box-logit", "positive-log"])
def test_log_abs_det_matches_autograd_jacobian(make):
    bijection, theta = make()
    logdet = bijection.log_abs_det(theta)
    assert logdet.shape == (theta.shape[0],)
    torch.testing.assert_close(bijection(theta)[1], logdet, rtol=0, atol=0)  # forward's log_det
    for row in range(0, theta.shape[0], 8):
        jac = torch.func.jacrev(lambda t: bijection(t.unsqueeze(0))[0].squeeze(0))(theta[row])
        sign, truth = torch.linalg.slogdet(jac)
        assert sign.item() == 1.0  # both maps increase in every coordinate
        torch.testing.assert_close(logdet[row], truth, rtol=0, atol=1e-9)


@pytest.mark.parametrize("make", [_box, _positive], ids=["box-logit", "positive-log"])
def test_round_trip_and_draws_land_inside_the_support(make):
    bijection, theta = make()
    torch.testing.assert_close(bijection.inverse(bijection(theta)[0]), theta, rtol=1e-9, atol=1e-12)
    u = torch.randn(4096, theta.shape[1], dtype=torch.float64) * 5.0
    back = bijection.inverse(u)
    if isinstance(bijection, BoxLogit):
        assert bool(((back >= bijection.low) & (back <= bijection.high)).all())
    else:
        assert bool((back > 0).all())
    # Back again, away from the edge margin where BoxLogit clamps (|u| < logit(1 - 1e-6) = 13.8).
    mid = u.abs().max(dim=1).values < 10.0
    torch.testing.assert_close(bijection(back[mid])[0], u[mid], rtol=1e-6, atol=1e-6)


def test_change_of_variables_gives_the_uniform_density_on_the_box():
    # If u = T(theta) has the logistic density, theta is uniform on the box: the density of theta
    # computed through log_abs_det must be -log(volume) everywhere.
    box, theta = _box()
    u = box(theta)[0]
    logistic = -u - 2.0 * torch.nn.functional.softplus(-u)  # log sigma'(u) per coordinate
    log_p_theta = logistic.sum(-1) + box.log_abs_det(theta)
    volume = (box.high - box.low).prod()
    torch.testing.assert_close(log_p_theta, -volume.log().expand(theta.shape[0]), rtol=0, atol=1e-9)


def test_edges_map_to_finite_values():
    box, _ = _box()
    edges = torch.stack([box.low, box.high])
    assert torch.isfinite(box(edges)[0]).all() and torch.isfinite(box.log_abs_det(edges)).all()
    assert torch.isfinite(PositiveLog(2)(torch.zeros(1, 2))[0]).all()


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="greater"):
        BoxLogit(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        BoxLogit(torch.zeros(2), torch.ones(3))
    with pytest.raises(ValueError, match="dim"):
        PositiveLog(0)


# -- the sbibm side ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task", "kind"),
    [("two_moons", BoxLogit), ("sir", PositiveLog), ("gaussian_linear", type(None))],
)
def test_support_map_follows_the_prior(task, kind):
    pytest.importorskip("sbibm")
    from freeflows.data.sbi import get_task, support_map

    bijection = support_map(task)
    assert isinstance(bijection, kind)
    if bijection is not None:
        prior = get_task(task).get_prior_dist()
        draws = bijection.inverse(torch.randn(2000, bijection.dim) * 4.0)
        inside = torch.isfinite(prior.log_prob(draws))
        assert inside.float().mean().item() > 0.999  # only draws rounded onto an open edge may miss


def test_unbounded_data_set_and_its_posterior_log_prob():
    pytest.importorskip("sbibm")
    from freeflows.data.sbi import load_sbi_task, posterior_log_prob

    plain = load_sbi_task("slcp", 300, seed=2)
    data = load_sbi_task("slcp", 300, seed=2, unbounded=True)
    support, theta_std = data.meta["theta_support_map"], data.meta["theta_standardizer"]
    assert isinstance(support, BoxLogit) and plain.meta["theta_support_map"] is None
    # The same simulations: mapping the unbounded data back gives the plain data's theta.
    theta = support.inverse(theta_std.inverse(data.train.x))
    plain_theta = plain.meta["theta_standardizer"].inverse(plain.train.x)
    torch.testing.assert_close(theta, plain_theta, atol=1e-5, rtol=0)
    torch.testing.assert_close(data.train.c, plain.train.c)
    # A model that is N(0, I) on the standardised unbounded theta: its density of theta, through
    # posterior_log_prob, must equal the density computed by autograd's change of variables.
    theta = theta[:5].double()
    std64 = type(theta_std)(theta_std.mean.double(), theta_std.std.double())
    box64 = BoxLogit(support.low.double(), support.high.double())
    normal = torch.distributions.Normal(torch.zeros(5, dtype=torch.float64), 1.0)
    log_q_std = normal.log_prob(std64(box64(theta)[0])[0]).sum(-1)
    got = posterior_log_prob(log_q_std, std64, theta=theta, support=box64)
    for row in range(5):
        jac = torch.func.jacrev(lambda t: std64(box64(t.unsqueeze(0))[0])[0].squeeze(0))(theta[row])
        torch.testing.assert_close(got[row], log_q_std[row] + torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="needs theta"):
        posterior_log_prob(log_q_std, std64, support=box64)
    with pytest.raises(ValueError, match="true or false"):
        load_sbi_task("slcp", 300, unbounded="yes")
