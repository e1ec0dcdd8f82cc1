"""The ``"batched"`` C2ST classifier: scikit-learn's ``MLPClassifier`` (sbibm's settings) re-
implemented in torch for many nets at once, and :func:`freeflows.eval.c2st.c2st_many`.

Evidence that it runs the same algorithm as scikit-learn, with the same random draws:

* the parts: the folds are ``KFold``'s, the initial weights equal ``MLPClassifier``'s; the loss,
  gradients and Adam steps equal scikit-learn's private ``_backprop`` and ``AdamOptimizer`` on the
  same weights and batches (also partial, padded and saturated ones);
* whole trainings: with the same seed, a net follows ``MLPClassifier.fit``'s loss curve to
  float32 precision, stops at the same epoch and predicts the same test labels, also when nets of
  different sizes are trained together;
* C2ST scores: within 0.01 of ``classifier="sklearn"`` on the same samples (see the comment
  above :func:`test_batched_agrees_with_sklearn` for why the tolerance is sound).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch

import freeflows.eval.c2st as c2st_module
from freeflows.eval.c2st import c2st, c2st_many
from sbi_cases import two_moons_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(name: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples a side. Bayes accuracies: ``same`` 0.5, ``shift2d`` :math:`\\Phi(0.4)` = 0.655,
    ``shift5d`` (means 0.3 apart in 5-D) :math:`\\Phi(0.15)` = 0.560; ``bimodal2d`` is a standard
    normal against two Gaussian bumps (a boundary no line can draw)."""
    g = torch.Generator().manual_seed(seed)
    dim = 5 if name == "shift5d" else 2
    x, y = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    if name == "shift2d":
        y[:, 0] += 0.8
    elif name == "shift5d":
        y[:, 0] += 0.3
    elif name == "bimodal2d":
        y = 0.6 * y
        y[:, 0] += torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    elif name != "same":
        raise ValueError(name)
    return x, y


# -- the algorithm, step by step ------------------------------------------------------------------
def test_folds_are_sklearns_kfold():
    model_selection = pytest.importorskip("sklearn.model_selection")
    for n, seed in [(103, 1), (20000, 7)]:
        ours = c2st_module._fold_indices(n, 5, seed)
        theirs = model_selection.KFold(5, shuffle=True, random_state=seed).split(np.zeros(n))
        for fold, (_, test) in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(np.sort(fold), test)  # the same rows (sklearn sorts them)


def test_initial_weights_are_sklearns():
    """Glorot-uniform weights and biases, bound sqrt(6 / (fan_in + fan_out)): the very values
    scikit-learn draws from the same seed."""
    neural_network = pytest.importorskip("sklearn.neural_network")
    dim, width = 5, 50
    ours = c2st_module._glorot(dim, np.random.RandomState(3))
    mlp = neural_network.MLPClassifier(hidden_layer_sizes=(width, width), activation="relu")
    mlp._random_state = np.random.RandomState(3)
    theirs = [
        a for fan in [(dim, width), (width, width), (width, 1)] for a in mlp._init_coef(*fan, np.float32)
    ]
    assert [tuple(p.shape) for p in ours] == [(5, 50), (1, 50), (50, 50), (1, 50), (50, 1), (1, 1)]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a.numpy().reshape(b.shape), b)
    for i, (fan_in, fan_out) in enumerate([(5, 50), (50, 50)]):
        bound = (6 / (fan_in + fan_out)) ** 0.5
        for values in ours[2 * i : 2 * i + 2]:
            assert bound * 0.8 < values.abs().max() <= bound


def _sklearn_mlp(params: list[torch.Tensor]):
    """An ``MLPClassifier`` set up with the weights ``params`` (one net's :func:`_glorot` list)."""
    neural_network = pytest.importorskip("sklearn.neural_network")
    dim = params[0].shape[0]
    mlp = neural_network.MLPClassifier(hidden_layer_sizes=(10 * dim, 10 * dim))
    mlp.coefs_ = [p.numpy().copy() for p in params[0::2]]
    mlp.intercepts_ = [p.numpy()[0].copy() for p in params[1::2]]
    mlp.n_layers_, mlp.out_activation_ = 4, "logistic"
    return mlp


def test_loss_and_gradient_equal_sklearns_backprop():
    """Three nets: a full batch of 200 rows, a partial batch of 57 (the rest zero-weight padding),
    and inputs so large that probabilities saturate (and are clipped in the loss): loss (with the
    L2 term / batch size) and gradients as scikit-learn's."""
    dim, g = 3, torch.Generator().manual_seed(0)
    params = [c2st_module._glorot(dim, np.random.RandomState(s)) for s in (1, 2, 3)]
    nets = c2st_module._BatchedMLP.start(dim, params)
    x = torch.randn(3, c2st_module._ROWS, dim, generator=g) * torch.tensor([1.0, 1.0, 300.0]).view(3, 1, 1)
    y = torch.rand(3, c2st_module._ROWS, generator=g) > 0.5
    count = torch.tensor([200, 57, 200])
    w = (torch.arange(c2st_module._ROWS) < count.unsqueeze(1)).float()
    loss, grad = nets.loss_and_grad(x, y, w, count)
    grads = c2st_module._unflatten(grad, dim)
    saturated = nets.probability(x)[-1][2, :200]
    assert ((saturated < 1e-7) | (saturated > 1 - 1e-7)).float().mean() > 0.1
    for c in range(3):
        mlp, rows = _sklearn_mlp(params[c]), slice(0, int(count[c]))
        xc, yc = x[c, rows].numpy(), y[c, rows].numpy().reshape(-1, 1)
        coef_grads = [np.empty_like(a) for a in mlp.coefs_]
        intercept_grads = [np.empty_like(b) for b in mlp.intercepts_]
        activations = [xc, None, None, None]
        expected, coef_grads, intercept_grads = mlp._backprop(
            xc, yc, None, activations, [None] * 3, coef_grads, intercept_grads
        )
        assert loss[c].item() == pytest.approx(float(expected), rel=1e-6)
        for ours, theirs in zip(grads[0::2], coef_grads, strict=True):
            np.testing.assert_allclose(ours[c].numpy(), theirs, rtol=1e-4, atol=1e-7)
        for ours, theirs in zip(grads[1::2], intercept_grads, strict=True):
            np.testing.assert_allclose(ours[c, 0].numpy(), theirs, rtol=1e-4, atol=1e-7)


def test_adam_steps_equal_sklearns_and_skip_masked_nets():
    optimizers = pytest.importorskip("sklearn.neural_network._stochastic_optimizers")
    dim, g = 2, torch.Generator().manual_seed(0)
    params = [c2st_module._glorot(dim, np.random.RandomState(s)) for s in (1, 2)]
    nets = c2st_module._BatchedMLP.start(dim, params)
    theirs = [p.numpy().copy() for p in params[0]]
    adam = optimizers.AdamOptimizer(theirs, 1e-3, 0.9, 0.999, 1e-8)
    frozen = nets.theta[1].clone()
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in params[0]]
        grad = torch.zeros_like(nets.theta)
        for view, gradient in zip(c2st_module._unflatten(grad, dim), grads, strict=True):
            view[0] = gradient
        nets.adam_step(grad, torch.tensor([True, False]))
        adam.update_params(theirs, [gr.numpy() for gr in grads])
    for ours, expected in zip(nets.params, theirs, strict=True):
        np.testing.assert_allclose(ours[0].numpy(), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(nets.theta[1], frozen) and nets.t.tolist() == [5.0, 0.0]


def _sklearn_fit(data: torch.Tensor, labels: torch.Tensor, job: c2st_module._Job) -> tuple[np.ndarray, float]:
    """Loss curve and test accuracy of scikit-learn's ``fit`` (sbibm's settings, ``random_state``
    the job's seed) on the job's training rows."""
    neural_network = pytest.importorskip("sklearn.neural_network")
    dim = data.shape[1]
    mlp = neural_network.MLPClassifier(
        hidden_layer_sizes=(10 * dim, 10 * dim),
        activation="relu",
        solver="adam",
        max_iter=10000,
        random_state=job.seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp.fit(data[job.train].numpy(), labels[job.train].numpy())
    accuracy = float((mlp.predict(data[job.test].numpy()) == labels[job.test].numpy()).mean())
    return np.array(mlp.loss_curve_), accuracy


@pytest.mark.parametrize("sizes", [[120], [200], [1000], [150, 300, 401]])
def test_training_follows_sklearns_fit(monkeypatch, sizes):
    """Nets with ``sizes`` training rows (below, at and above one batch of 200; several sizes
    trained together, so that some nets skip the last steps of an epoch) follow scikit-learn's
    loss curve with the same seed to float32 precision, stop at the same epoch and predict the
    same test labels.

    (The two differ in float32 rounding: numpy and torch sum in different orders. Training is
    chaotic enough that this can grow, e.g. for one training set of 300 rows from 1e-7 at epoch 21
    to 1e-5 at epoch 70 and 2e-4 later, stopping at epoch 347 instead of 345; so the data are
    chosen to stop within a few hundred epochs, and these sizes and seeds to stay close.)
    """
    dim, g = 2, torch.Generator().manual_seed(0)
    total = sum(sizes) + 100 * len(sizes)
    labels = (torch.rand(total, generator=g) > 0.5).float()
    data = torch.randn(total, dim, generator=g)
    data[:, 0] += 2 * labels
    jobs, start = [], 0
    for i, n in enumerate(sizes):
        rows = torch.arange(start, start + n + 100)
        jobs.append(c2st_module._Job(rows[:n], rows[n:], seed=3 + i))
        start += n + 100
    curves: dict[int, list[float]] = {i: [] for i in range(len(jobs))}
    epoch = c2st_module._epoch

    def recording_epoch(mlp, data, labels, alive, shuffles):
        losses = epoch(mlp, data, labels, alive, shuffles)
        for job, loss in dict(zip(map(id, alive), losses.tolist(), strict=True)).items():
            curves[[id(j) for j in jobs].index(job)].append(loss)
        return losses

    monkeypatch.setattr(c2st_module, "_epoch", recording_epoch)
    accuracies = c2st_module._train_and_score(data, labels, jobs)
    for i, job in enumerate(jobs):
        curve, accuracy = _sklearn_fit(data, labels, job)
        assert len(curves[i]) == len(curve) > 20
        # The rounding drift grows with the epoch: below 1e-6 over the first 50 epochs, 1.2e-5
        # after 430 epochs with numpy 2.4 and scikit-learn 1.9.
        np.testing.assert_allclose(curves[i][:50], curve[:50], rtol=0, atol=1e-6)
        np.testing.assert_allclose(curves[i], curve, rtol=0, atol=5e-5)
        assert accuracies[i] == accuracy


# -- c2st_many and c2st(classifier="batched") ------------------------------------------------------
def test_c2st_many_equals_c2st_pair_by_pair():
    """Pairs of several dimensions and sizes (folds of unequal sizes), trained together by
    c2st_many, score exactly as each alone with c2st(classifier="batched"), with one seed for all
    pairs or one per pair."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for n, m, dim, shift in [(150, 151, 2, 1.0), (233, 230, 2, 0.5), (97, 97, 3, 2.0), (180, 184, 1, 0.7)]:
        x, y = torch.randn(n, dim, generator=g), torch.randn(m, dim, generator=g)
        y[:, 0] += shift
        pairs.append((x, y))
    seeds = [1, 2, 1, 5]
    single = [c2st(x, y, seed=s, classifier="batched") for (x, y), s in zip(pairs, seeds, strict=True)]
    assert c2st_many(pairs, seed=seeds) == single
    three_folds = [c2st(*pair, n_folds=3, classifier="batched") for pair in pairs[:2]]
    assert c2st_many(pairs[:2], seed=1, n_folds=3) == three_folds
    assert 0.3 < min(single) and max(single) < 0.95


def test_batched_is_chance_on_equal_and_one_on_disjoint_sets():
    same, apart = c2st_many([_case("same", 300), (_case("same", 300)[0], _case("same", 300)[1] + 8.0)])
    assert 0.42 < same < 0.58, same
    assert apart > 0.99, apart


def test_batched_rejects_bad_input():
    x, y = _case("same", 20)
    bad = y.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        c2st(x, bad, classifier="batched")
    with pytest.raises(ValueError, match="finite"):
        c2st_many([(x, y), (x, bad)])
    with pytest.raises(ValueError):
        c2st_many([(x, y[:, :1])])
    with pytest.raises(ValueError, match="n_folds"):
        c2st_many([(x, y)], n_folds=1)
    with pytest.raises(ValueError, match="seeds"):
        c2st_many([(x, y)], seed=[1, 2])


# -- agreement of the scores with classifier="sklearn" ------------------------------------------------
# Both paths z-score alike and use the same folds and the same random draws, so their scores differ
# only through float32 rounding (numpy and torch sum in different orders). In short trainings that
# moves nothing or a few test predictions (2-D, n = 5,000 a side: differences 0 to 0.0009); over
# long ones it can grow until the two nets are as different as two seeds' nets. The worst case is
# then that of independent draws, measured with unshared draws (batched - sklearn, same seed):
# shift2d at n = 5,000, 20 seeds: mean -0.0005, sd 0.0017; bimodal2d, 6 seeds: sd 0.002; equal
# 2-D distributions, 6 seeds: sd 0.0055; shift5d at n = 10,000, 3 seeds: sd 0.005 -- that is
# sqrt(q / N) for a fraction q of the N = 2n test points predicted differently (q ~ 0.3 where the
# nets fit noise). So single seeds are compared where that sd is <= 0.002, and means over 8 seeds
# elsewhere (sd / sqrt(8) <= 0.002): the 0.01 tolerance is >= 5 sd even then, and a bias of 0.01
# (a third of the old "torch" classifier's in 5-D) would still be caught.
def _scores(x: torch.Tensor, y: torch.Tensor, seeds: list[int]) -> tuple[float, float, float, float]:
    """Mean C2ST over ``seeds`` of the sklearn path and of the batched one, and their CPU seconds."""
    start = time.process_time()
    reference = float(np.mean([c2st(x, y, seed=s, classifier="sklearn") for s in seeds]))
    middle = time.process_time()
    fast = float(np.mean(c2st_many([(x, y)] * len(seeds), seed=seeds)))
    return reference, fast, middle - start, time.process_time() - middle


@pytest.mark.parametrize("name", ["shift2d", "bimodal2d"])
def test_batched_agrees_with_sklearn(name):
    pytest.importorskip("sklearn")
    reference, fast, slow_s, fast_s = _scores(*_case(name, 5000), seeds=[1])
    print(f"{name}: sklearn {reference:.4f} ({slow_s:.1f} s), batched {fast:.4f} ({fast_s:.1f} s)")
    assert abs(fast - reference) < 0.01


@pytest.mark.slow
def test_batched_agrees_with_sklearn_on_equal_distributions():
    pytest.importorskip("sklearn")
    reference, fast, slow_s, fast_s = _scores(*_case("same", 5000), seeds=list(range(1, 9)))
    print(f"same: sklearn {reference:.4f} ({slow_s:.1f} s), batched {fast:.4f} ({fast_s:.1f} s), 8 seeds")
    assert abs(fast - reference) < 0.01 and abs(reference - 0.5) < 0.01


@pytest.mark.slow
def test_batched_agrees_with_sklearn_in_5d():
    """Where the old ``"torch"`` classifier scored 0.033 above scikit-learn (whose net is below the
    Bayes accuracy 0.560 here), the batched one agrees with scikit-learn."""
    pytest.importorskip("sklearn")
    reference, fast, slow_s, fast_s = _scores(*_case("shift5d", 10000), seeds=list(range(1, 9)))
    print(f"shift5d: sklearn {reference:.4f} ({slow_s:.1f} s), batched {fast:.4f} ({fast_s:.1f} s), 8 seeds")
    assert abs(fast - reference) < 0.01 and reference < 0.55


@pytest.mark.slow
@pytest.mark.parametrize("case", ["same", "blurred", "gaussian"])
def test_batched_agrees_with_sklearn_on_two_moons_posteriors(case):
    pytest.importorskip("sklearn")
    pytest.importorskip("sbibm")
    seeds = list(range(1, 9)) if case == "same" else [1, 2]
    reference, fast, slow_s, fast_s = _scores(*two_moons_pairs(5000)[case], seeds=seeds)
    print(f"two_moons {case}: sklearn {reference:.4f} ({slow_s:.1f} s), batched {fast:.4f} ({fast_s:.1f} s)")
    assert abs(fast - reference) < 0.01
