r"""Classifier two-sample test (C2ST), with sbibm's protocol.

Given samples :math:`X = \{x_i\}_{i=1}^{n}` from :math:`P` and :math:`Y = \{y_j\}_{j=1}^{m}` from
:math:`Q`, label them 0 and 1 and train a classifier to tell them apart. The C2ST score is its
held-out accuracy, averaged over :math:`K` cross-validation folds:

.. math:: \mathrm{C2ST}(X, Y) = \frac{1}{K}\sum_{k=1}^{K} \frac{1}{|F_k|}
   \sum_{(v, \ell) \in F_k} \mathbb 1\big[\hat h_{-k}(v) = \ell\big] ,

where :math:`\hat h_{-k}` is trained on all folds but :math:`F_k`. It is :math:`\approx 0.5` when
:math:`P = Q` and tends to 1 as they separate (for :math:`n = m` its limit is
:math:`\tfrac12 + \tfrac12\,\mathrm{TV}(P, Q)` for a Bayes-optimal classifier).

**The protocol** (sbibm's, which reported SBI results use): both sets are z-scored with the mean
and standard deviation of :math:`X`; the classifier is scikit-learn's ``MLPClassifier`` with two
ReLU hidden layers of :math:`10\,d` units and a logistic output, trained by Adam; :math:`K = 5`
shuffled folds (``KFold(5, shuffle=True, random_state=seed)``); the score is the mean accuracy.

**The classifier's training** (scikit-learn's defaults): weights and biases start uniform in
:math:`\pm\sqrt{6 / (\text{fan\_in} + \text{fan\_out})}`. Each epoch shuffles the :math:`n`
training rows afresh and cuts them into batches :math:`b` of :math:`\min(200, n)` rows (the last
one partial), each taking one Adam step on

.. math:: L_b = -\frac{1}{|b|} \sum_{i \in b} \big[\ell_i \log \bar p_i + (1 - \ell_i)
   \log(1 - \bar p_i)\big] + \frac{\alpha}{2 |b|} \sum_l \|W_l\|_F^2 ,\qquad \alpha = 10^{-4},

(:math:`\bar p` the predicted probability clipped to :math:`[\epsilon, 1 - \epsilon]`,
:math:`\epsilon` float32's machine epsilon; biases are not penalised), with

.. math:: \theta \leftarrow \theta - \eta \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
   \frac{m_t}{\sqrt{v_t} + 10^{-8}} ,\qquad \eta = 10^{-3},\ \beta = (0.9, 0.999) .

After an epoch of mean loss :math:`\bar L = \sum_b |b| L_b / n`, training stops once more than
10 epochs in a row had :math:`\bar L > \min(\text{earlier } \bar L) - 10^{-4}` (or after 10,000
epochs). A test point is labelled 1 iff :math:`\bar p > 1/2`.

Three classifiers implement the protocol:

* ``"sklearn"`` (the default, the reference): scikit-learn's ``MLPClassifier`` with sbibm's
  settings, fold by fold. It matches ``sbibm.metrics.c2st`` exactly on the same seed, and takes
  from seconds to minutes for 10,000 against 10,000 samples.
* ``"batched"``, and :func:`c2st_many` for many pairs: the same algorithm re-implemented in torch
  (float32, as scikit-learn on float32 data), training all folds (and all pairs) at once as one
  batched model whose nets stop one by one. It even makes scikit-learn's random draws (folds,
  initial weights and epoch shuffles from ``numpy.random.RandomState(seed)``, in scikit-learn's
  order), so its nets repeat scikit-learn's up to float32 rounding, which numpy and torch do in
  different orders and which, over long trainings, can grow until a net stops at another epoch.
  ``tests/test_eval_c2st.py`` shows that its initial weights, losses, gradients and Adam steps
  equal scikit-learn's; that a whole training follows ``MLPClassifier.fit``'s loss curve to
  float32 precision, stops at the same epoch and predicts the same labels; and that its scores
  are within 0.01 of ``"sklearn"``'s on the same samples, including in 5-D (2-D, 5,000 a side:
  differences of 0 to 0.001). **It is sbibm-comparable**, and faster
  (``benchmarks/results/c2st_speed.md``): use it, through :func:`c2st_many`, for benchmarks with
  many comparisons.
* ``"torch"``: the same network in torch, trained with large-batch Adam and early stopping on a
  held-out tenth of each training fold. It is a *different, stronger* classifier, not a copy of
  sbibm's: where sbibm's MLP is near Bayes-optimal the two agree (two_moons posteriors and 2-D
  Gaussians, 5,000 to 10,000 samples a side: within 0.005, see ``tests/test_eval_c2st.py``), but in
  5-D sbibm's MLP under-fits, and the torch score was higher by 0.033 (10,000 a side, means 0.3
  apart; Bayes accuracy 0.560, sbibm 0.532, torch 0.565), while taking 5 s instead of 120 s.
  **Not sbibm-comparable:** use it for quick checks only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, get_args

import numpy as np
import torch
from torch import Tensor, nn

C2STClassifier = Literal["sklearn", "torch", "batched"]
C2ST_CLASSIFIERS: tuple[str, ...] = get_args(C2STClassifier)


def c2st(
    x: Tensor,
    y: Tensor,
    *,
    seed: int = 1,
    n_folds: int = 5,
    z_score: bool = True,
    classifier: C2STClassifier = "sklearn",
) -> float:
    r"""C2ST accuracy of sample sets ``x [n, d]`` and ``y [m, d]`` (see the module docstring).

    Args:
        x: samples of :math:`P` (for SBI: the reference posterior); its statistics z-score both.
        y: samples of :math:`Q` (for SBI: the approximate posterior).
        seed: seed of the folds and the classifier.
        n_folds: number of cross-validation folds :math:`K`.
        z_score: z-score both sets with the mean and standard deviation of ``x``.
        classifier: ``"sklearn"`` (reference), ``"batched"`` (its fast copy) or ``"torch"``.
    """
    data, labels = _labelled(x, y, z_score)
    _check_folds(n_folds)
    if classifier == "sklearn":
        return _c2st_sklearn(data, labels, seed, n_folds)
    if classifier == "torch":
        return _c2st_torch(data, labels, seed, n_folds)
    if classifier == "batched":
        return _c2st_batched([(data, labels)], [seed], n_folds)[0]
    raise ValueError(f"unknown C2ST classifier {classifier!r}; choose 'sklearn', 'torch' or 'batched'")


def c2st_many(
    pairs: Sequence[tuple[Tensor, Tensor]],
    *,
    seed: int | Sequence[int] = 1,
    n_folds: int = 5,
    z_score: bool = True,
) -> list[float]:
    r"""C2ST accuracies of many pairs ``(x, y)`` with the ``"batched"`` classifier, all at once.

    The :math:`C = \text{pairs} \times K` classifiers are trained simultaneously as one batched
    model (one per dimension :math:`d` among the pairs), each stopping on its own criterion. The
    result is exactly ``[c2st(x, y, seed=s, n_folds=n_folds, z_score=z_score,
    classifier="batched") for ...]`` (at one thread): a pair's folds are
    ``KFold(n_folds, shuffle=True, random_state=s)``'s, and each of its classifiers draws its
    initial weights and shuffles as ``MLPClassifier(random_state=s)`` would, all from
    ``numpy.random.RandomState(s)``, whatever the other pairs.

    Args:
        pairs: the ``(x [n, d], y [m, d])`` pairs; sizes and dimensions may differ between pairs.
        seed: seed of every pair, or one seed per pair.
        n_folds: number of cross-validation folds :math:`K`.
        z_score: z-score each pair with the mean and standard deviation of its ``x``.
    """
    seeds = [seed] * len(pairs) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(pairs):
        raise ValueError(f"got {len(seeds)} seeds for {len(pairs)} pairs")
    _check_folds(n_folds)
    return _c2st_batched([_labelled(x, y, z_score) for x, y in pairs], seeds, n_folds)


def _labelled(x: Tensor, y: Tensor, z_score: bool) -> tuple[Tensor, Tensor]:
    """Checked, optionally z-scored samples ``[x; y]`` on the CPU and their labels 0 and 1."""
    x, y = _check_samples(x, y)
    if z_score:
        mean, std = x.mean(dim=0), x.std(dim=0)
        x, y = (x - mean) / std, (y - mean) / std
    data = torch.cat([x, y]).cpu()
    if not torch.isfinite(data).all():
        raise ValueError("z-scored C2ST samples are not finite: x has a constant coordinate")
    labels = torch.cat([torch.zeros(x.shape[0]), torch.ones(y.shape[0])])
    return data, labels


def _check_folds(n_folds: int) -> None:
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")


def _check_samples(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [n, d] and [m, d], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("C2ST needs at least 2 samples in each set")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("C2ST samples must be finite")
    return x.detach().float(), y.detach().float()


def _c2st_sklearn(data: Tensor, labels: Tensor, seed: int, n_folds: int) -> float:
    """sbibm's protocol with scikit-learn's MLPClassifier (needs scikit-learn)."""
    try:
        from sklearn.model_selection import KFold, cross_val_score
        from sklearn.neural_network import MLPClassifier
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "classifier='sklearn' needs scikit-learn (pip install -e .[sbi]); or use classifier='torch'"
        ) from error
    width = 10 * data.shape[1]
    mlp = MLPClassifier(
        hidden_layer_sizes=(width, width),
        activation="relu",
        solver="adam",
        max_iter=10000,
        random_state=seed,
    )
    folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    scores = cross_val_score(mlp, data.numpy(), labels.numpy(), cv=folds, scoring="accuracy")
    return float(np.mean(scores).astype(np.float32))


def _fold_indices(n: int, n_folds: int, seed: int) -> list[np.ndarray]:
    """``n_folds`` disjoint folds of a seeded shuffle of ``range(n)``, sizes differing by at most 1."""
    order = np.random.RandomState(seed).permutation(n)
    return list(np.array_split(order, n_folds))


class _MLPClassifier(nn.Module):
    """Logit of label 1: ``d -> 10d -> 10d -> 1`` with ReLU, as in sbibm's protocol."""

    def __init__(self, dim: int):
        super().__init__()
        width = 10 * dim
        self.net = nn.Sequential(
            nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
        )

    def forward(self, v: Tensor) -> Tensor:
        return self.net(v).squeeze(-1)


def _train_classifier(
    data: Tensor,
    labels: Tensor,
    generator: torch.Generator,
    batch_size: int = 1024,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    eval_every: int = 50,
    patience: int = 10,
    max_steps: int = 10000,
) -> _MLPClassifier:
    """Adam on the binary cross-entropy; every ``eval_every`` steps the loss on a held-out tenth
    is checked, training stops after ``patience`` checks without improvement, and the weights of
    the best check are kept. Counting in steps, not epochs, keeps small sets from stopping early.
    """
    n = data.shape[0]
    perm = torch.randperm(n, generator=generator)
    n_hold = max(1, n // 10)
    hold, fit = perm[:n_hold], perm[n_hold:]
    x_fit, y_fit, x_hold, y_hold = data[fit], labels[fit], data[hold], labels[hold]
    torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
    model = _MLPClassifier(data.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    batch_size = min(batch_size, x_fit.shape[0])
    best, best_state, bad = float("inf"), copy.deepcopy(model.state_dict()), 0
    order, position = torch.randperm(x_fit.shape[0], generator=generator), 0
    for step in range(1, max_steps + 1):
        if position + batch_size > x_fit.shape[0]:
            order, position = torch.randperm(x_fit.shape[0], generator=generator), 0
        idx = order[position : position + batch_size]
        position += batch_size
        optimizer.zero_grad()
        loss_fn(model(x_fit[idx]), y_fit[idx]).backward()
        optimizer.step()
        if step % eval_every == 0:
            with torch.no_grad():
                held = loss_fn(model(x_hold), y_hold).item()
            if held < best - 1e-4:
                best, best_state, bad = held, copy.deepcopy(model.state_dict()), 0
            else:
                bad += 1
                if bad >= patience:
                    break
    model.load_state_dict(best_state)
    return model


def _c2st_torch(data: Tensor, labels: Tensor, seed: int, n_folds: int) -> float:
    """The protocol with a torch MLP trained with early stopping (no scikit-learn needed)."""
    generator = torch.Generator().manual_seed(seed)
    folds = _fold_indices(data.shape[0], n_folds, seed)
    scores = []
    with torch.random.fork_rng(devices=[]):
        for k, test in enumerate(folds):
            train = np.concatenate([f for j, f in enumerate(folds) if j != k])
            train_t, test_t = torch.from_numpy(train), torch.from_numpy(test)
            model = _train_classifier(data[train_t], labels[train_t], generator)
            with torch.no_grad():
                predicted = (model(data[test_t]) > 0).float()
            scores.append((predicted == labels[test_t]).float().mean().item())
    return float(np.mean(scores))


# -- "batched": scikit-learn's MLPClassifier (sbibm's settings) re-implemented for C nets at once ---
_ALPHA = 1e-4  # L2 penalty
_BATCH = 200  # batch_size="auto": min(200, n_train)
_LR, _BETA1, _BETA2, _EPS = 1e-3, 0.9, 0.999, 1e-8  # Adam
_TOL, _PATIENCE, _MAX_EPOCHS = 1e-4, 10, 10000  # stopping on the training loss
_CLIP = float(torch.finfo(torch.float32).eps)  # probabilities are clipped to [eps, 1 - eps] in the loss
# Exactness: a net's result must not depend on the other nets in the batch, but MKL's matmuls and
# vectorised kernels round differently depending on alignment and on where a tensor ends. So every
# net's block of a tensor starts on 64 bytes (16 floats): batches padded to _ROWS rows with
# zero-weight rows, parameters in rows of 16-float aligned blocks (_layout), element-wise
# transcendentals on rows padded to 64 entries (_rowwise); and a lone net is trained as two copies
# (a batch of one takes other matmul kernels).
_ROWS = 208  # 200 rows padded to a multiple of 16
_ALIGN = 16  # floats in 64 bytes
_CHUNK_UNITS = 800  # nets x hidden units per chunk of a step


class _Job(NamedTuple):
    """One classifier: rows of the shared data it trains and is tested on, and its seed."""

    train: Tensor
    test: Tensor
    seed: int


def _glorot(dim: int, random_state: np.random.RandomState) -> list[Tensor]:
    r"""``[W1, b1, W2, b2, W3, b3]`` of ``d -> 10d -> 10d -> 1``: weights and biases of a layer
    uniform in :math:`\pm\sqrt{6 / (\text{fan\_in} + \text{fan\_out})}` (Glorot), drawn in this
    order in float64 and rounded to float32, as scikit-learn draws them."""
    width = 10 * dim
    params = []
    for fan_in, fan_out in [(dim, width), (width, width), (width, 1)]:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        for shape in [(fan_in, fan_out), (fan_out,)]:
            draw = random_state.uniform(-bound, bound, shape).astype(np.float32)
            params.append(torch.from_numpy(draw).view(-1, fan_out))
    return params


def _layout(dim: int) -> tuple[list[tuple[int, int]], list[int], int]:
    """Shapes of ``[W1, b1, W2, b2, W3, b3]``, their offsets in a net's row of the flat parameter
    buffer (each a multiple of 16 floats), and the row's length."""
    width = 10 * dim
    shapes = [(dim, width), (1, width), (width, width), (1, width), (width, 1), (1, 1)]
    offsets, size = [], 0
    for rows, cols in shapes:
        offsets.append(size)
        size += -(-rows * cols // _ALIGN) * _ALIGN
    return shapes, offsets, size


def _unflatten(flat: Tensor, dim: int) -> list[Tensor]:
    """Views ``[C, fan_in, fan_out]`` of ``[W1, b1, W2, b2, W3, b3]`` in ``flat [C, size]``."""
    shapes, offsets, _ = _layout(dim)
    return [flat[:, o : o + r * c].view(-1, r, c) for (r, c), o in zip(shapes, offsets, strict=True)]


def _rowwise(function: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """``function(t)`` of an element-wise ``function`` and ``t [C, B]``, computed on rows padded to
    a multiple of 64 entries (so that no net's entries are a vectorised kernel's remainder)."""
    width = -(-t.shape[-1] // 64) * 64
    return function(nn.functional.pad(t, (0, width - t.shape[-1]), value=1.0))[..., : t.shape[-1]]


def _relu_backward(delta: Tensor, hidden: Tensor) -> Tensor:
    """``delta`` where the ReLU output ``hidden > 0``, else 0 (as scikit-learn's derivative)."""
    return torch.ops.aten.threshold_backward(delta, hidden, 0.0)


class _BatchedMLP:
    r"""``C`` independent MLPs :math:`d \to 10d \to 10d \to 1` (ReLU, logistic output), each
    trained by scikit-learn's Adam on its own batches. A net's parameters are a row of ``theta
    [C, size]`` (see :func:`_layout`), viewed as weights ``[C, fan_in, fan_out]`` and biases
    ``[C, 1, fan_out]``; gradients are back-propagated by hand (as scikit-learn does); ``m, v``
    are Adam's moments and ``t [C]`` its step counts.
    """

    def __init__(self, dim: int, theta: Tensor, m: Tensor, v: Tensor, t: Tensor):
        self.dim, self.theta, self.m, self.v, self.t = dim, theta, m, v, t
        self.params = _unflatten(theta, dim)

    @classmethod
    def start(cls, dim: int, params: list[list[Tensor]]) -> _BatchedMLP:
        """Nets with initial parameters ``params`` (one :func:`_glorot` list per net)."""
        theta = torch.zeros(len(params), _layout(dim)[2])
        for view, values in zip(_unflatten(theta, dim), zip(*params, strict=True), strict=True):
            view.copy_(torch.stack(values))
        zeros = torch.zeros_like(theta)
        return cls(dim, theta, zeros, zeros.clone(), torch.zeros(len(theta), dtype=torch.float64))

    def select(self, nets: Tensor | slice) -> _BatchedMLP:
        """The nets ``nets``: a copy for indices (possibly repeated), a view for a slice."""
        return _BatchedMLP(self.dim, self.theta[nets], self.m[nets], self.v[nets], self.t[nets])

    def chunks(self) -> list[tuple[slice, _BatchedMLP]]:
        """Views of consecutive groups of at least 2 nets, each small enough for the cache (a step
        of all the nets at once is slower when memory-bound), as ``(slice, nets)``."""
        size = max(4, _CHUNK_UNITS // (10 * self.dim))
        bounds = np.linspace(0, len(self.t), -(-len(self.t) // size) + 1).round().astype(int).tolist()
        slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        return [(s, self.select(s)) for s in slices]

    def probability(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r"""Hidden activations ``h1, h2 [C, B, 10d]`` and :math:`\hat p = \sigma(z)` ``[C, B]``."""
        w1, b1, w2, b2, w3, b3 = self.params
        h1 = torch.baddbmm(b1, x, w1).relu_()
        h2 = torch.baddbmm(b2, h1, w2).relu_()
        z = (h2 * w3.mT).sum(-1) + b3.view(-1, 1)  # one output unit: no matmul needed
        return h1, h2, _rowwise(torch.sigmoid, z)

    def loss_and_grad(self, x: Tensor, y: Tensor, w: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        r"""Batch loss of each net and its gradient (laid out as ``theta``): with :math:`b` the
        batch of a net (its rows of ``x [C, B, d]`` with weight ``w = 1``; ``count`` :math:`= |b|`),

        .. math:: L_b = -\frac{1}{|b|} \sum_{i \in b} \big[\ell_i \log \bar p_i
            + (1 - \ell_i) \log(1 - \bar p_i)\big] + \frac{\alpha}{2 |b|} \sum_l \|W_l\|_F^2 ,

        :math:`\bar p = \mathrm{clip}(\hat p, \epsilon, 1 - \epsilon)`; the gradient is that of
        the unclipped loss: :math:`\partial L_b / \partial z_i = (\hat p_i - \ell_i) / |b|`, back-
        propagated through the ReLUs, plus :math:`\alpha W_l / |b|` for each weight.
        """
        w1, _, w2, _, w3, _ = self.params
        h1, h2, p = self.probability(x)
        clipped = p.clamp(_CLIP, 1 - _CLIP)
        log_likelihood = (_rowwise(torch.log, torch.where(y, clipped, 1 - clipped)) * w).sum(1)
        squares = sum(weight.square().sum((1, 2)) for weight in (w1, w2, w3))
        loss = (0.5 * _ALPHA * squares - log_likelihood) / count
        delta3 = ((p - y.float()) * w).unsqueeze(-1)  # [C, B, 1]; zero on padding rows
        delta2 = _relu_backward(delta3 * w3.mT, h2)
        delta1 = _relu_backward(torch.bmm(delta2, w2.mT), h1)
        grad = torch.zeros_like(self.theta)
        g_w1, g_b1, g_w2, g_b2, g_w3, g_b3 = _unflatten(grad, self.dim)
        torch.baddbmm(w1, x.mT, delta1, beta=_ALPHA, out=g_w1)
        torch.baddbmm(w2, h1.mT, delta2, beta=_ALPHA, out=g_w2)
        torch.add((h2 * delta3).sum(1).unsqueeze(-1), w3, alpha=_ALPHA, out=g_w3)
        for g_b, delta in [(g_b1, delta1), (g_b2, delta2), (g_b3, delta3)]:
            torch.sum(delta, 1, keepdim=True, out=g_b)
        return loss, grad.div_(count.unsqueeze(1))

    def adam_step(self, grad: Tensor, update: Tensor | None = None) -> None:
        r"""scikit-learn's Adam step of the nets ``update`` (a mask ``[C]``; all if ``None``):

        .. math:: m \leftarrow \beta_1 m + (1 - \beta_1) g ,\quad
            v \leftarrow \beta_2 v + (1 - \beta_2) g^2 ,\quad
            \theta \leftarrow \theta - \eta \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
            \frac{m}{\sqrt v + \epsilon} .
        """
        self.t += 1.0 if update is None else update.double()
        rate = (_LR * (1 - _BETA2**self.t).sqrt() / (1 - _BETA1**self.t)).float().unsqueeze(1)
        m = self.m * _BETA1 + grad * (1 - _BETA1)
        v = self.v * _BETA2 + grad.square() * (1 - _BETA2)
        theta = self.theta - rate * m / (v.sqrt() + _EPS)
        if update is not None:
            keep = update.unsqueeze(1)
            m, v = torch.where(keep, m, self.m), torch.where(keep, v, self.v)
            theta = torch.where(keep, theta, self.theta)
        self.m.copy_(m)
        self.v.copy_(v)
        self.theta.copy_(theta)

    def accuracy(self, index: int, x: Tensor, labels: Tensor) -> float:
        """Accuracy of net ``index`` on ``x [n, d]``: label 1 iff :math:`\\hat p > 1/2`."""
        w1, b1, w2, b2, w3, b3 = (p[index] for p in self.params)
        z = torch.relu(torch.relu(x @ w1 + b1) @ w2 + b2) @ w3 + b3
        return float(((torch.sigmoid(z.view(-1)) > 0.5) == labels).double().mean())


class _Shuffles:
    r"""Each epoch, a fresh shuffle of every net's training rows, drawn as scikit-learn does: a
    net's stream is ``numpy.random.RandomState(seed)``, first used for :func:`_glorot`, then each
    epoch permuting the previous epoch's order by ``shuffle(arange(n))``. It depends only on the
    seed and the training size, so nets sharing both share one stream."""

    def __init__(self, jobs: list[_Job], dim: int):
        self.streams: dict[tuple[int, int], tuple[np.random.RandomState, np.ndarray]] = {}
        for job in jobs:
            key = (job.seed, len(job.train))
            if key not in self.streams:
                random_state = np.random.RandomState(job.seed)
                _glorot(dim, random_state)
                self.streams[key] = (random_state, np.arange(len(job.train)))

    def orders(self, jobs: list[_Job], width: int, pad: int) -> Tensor:
        """The next epoch's ``[C, width]`` rows of the shared data: each net's shuffled training
        rows first, then ``pad``."""
        keys = [(job.seed, len(job.train)) for job in jobs]
        order = torch.full((len(jobs), width), pad, dtype=torch.int32)
        for key in dict.fromkeys(keys):
            random_state, previous = self.streams[key]
            permutation = np.arange(key[1])
            random_state.shuffle(permutation)
            self.streams[key] = (random_state, previous[permutation])
            rows = torch.from_numpy(previous[permutation])
            for c in (c for c, k in enumerate(keys) if k == key):
                order[c, : key[1]] = jobs[c].train[rows]
        return order


def _train_and_score(data: Tensor, labels: Tensor, jobs: list[_Job]) -> list[float]:
    r"""Train the nets of ``jobs`` on rows of ``data [N, d]`` simultaneously, as scikit-learn's
    ``MLPClassifier(solver="adam")`` would each; return their test accuracies.

    An epoch cuts a fresh shuffle of a net's :math:`n` training rows into batches of
    :math:`\min(200, n)` (the last one partial) with one Adam step each; nets with fewer batches
    skip the last steps. After each epoch, with :math:`\bar L = \sum_b |b| L_b / n`, a net counts
    an epoch without improvement if :math:`\bar L > \bar L_{\mathrm{best}} - \mathrm{tol}` (else
    resets the count), then :math:`\bar L_{\mathrm{best}} \leftarrow \min(\bar L_{\mathrm{best}},
    \bar L)`. It stops when the count exceeds 10 or after 10,000 epochs, is tested, and is dropped.
    """
    dim = data.shape[1]
    data = torch.cat([data.float(), data.new_zeros(1, dim)])  # the last row pads the batches
    labels = torch.cat([labels.bool(), labels.new_zeros(1, dtype=torch.bool)])
    shuffles = _Shuffles(jobs, dim)
    init = {seed: _glorot(dim, np.random.RandomState(seed)) for seed in {j.seed for j in jobs}}
    alive = list(range(len(jobs))) * (2 if len(jobs) == 1 else 1)  # the job of each net
    mlp = _BatchedMLP.start(dim, [init[jobs[j].seed] for j in alive])
    best = torch.full((len(alive),), float("inf"))
    bad = torch.zeros(len(alive), dtype=torch.long)
    scores = [0.0] * len(jobs)
    for epoch in range(1, _MAX_EPOCHS + 1):
        loss = _epoch(mlp, data, labels, [jobs[j] for j in alive], shuffles)
        if not torch.isfinite(loss).all():  # scikit-learn would train on to max_iter, then raise
            raise ValueError("C2ST classifier training diverged (non-finite loss)")
        bad = torch.where(loss > best - _TOL, bad + 1, 0)
        best = torch.minimum(best, loss)
        done = (bad > _PATIENCE) | (epoch == _MAX_EPOCHS)
        for c in done.nonzero().view(-1).tolist():
            job = jobs[alive[c]]
            scores[alive[c]] = mlp.accuracy(c, data[job.test], labels[job.test])
        if done.all():
            break
        keep = (~done).nonzero().view(-1)
        if len(keep) == 1:  # train two copies of a lone net (see _ROWS)
            keep = keep.repeat(2)
        if not torch.equal(keep, torch.arange(len(alive))):
            mlp = mlp.select(keep)
            best, bad, alive = best[keep], bad[keep], [alive[c] for c in keep.tolist()]
    return scores


def _epoch(mlp: _BatchedMLP, data: Tensor, labels: Tensor, jobs: list[_Job], shuffles: _Shuffles) -> Tensor:
    """One epoch of every net (see :func:`_train_and_score`); returns the epoch losses ``[C]``."""
    sizes = torch.tensor([len(job.train) for job in jobs])
    steps = int((sizes.max() + _BATCH - 1) // _BATCH)
    pad = data.shape[0] - 1
    order = shuffles.orders(jobs, steps * _BATCH, pad).view(-1, steps, _BATCH).transpose(0, 1)
    order = nn.functional.pad(order, (0, _ROWS - _BATCH), value=pad)  # [steps, C, _ROWS]
    count = (sizes - _BATCH * torch.arange(steps).unsqueeze(1)).clamp(0, _BATCH)  # [steps, C]
    total = torch.zeros(len(jobs))
    chunks = mlp.chunks()
    for k in range(steps):
        x, y, w = data[order[k]], labels[order[k]], (order[k] != pad).float()
        for nets, part in chunks:
            n = count[k, nets]
            loss, grad = part.loss_and_grad(x[nets], y[nets], w[nets], n.clamp(min=1))
            total[nets] += loss * n
            part.adam_step(grad, None if bool(n.all()) else n > 0)
    return total / sizes


def _c2st_batched(sets: list[tuple[Tensor, Tensor]], seeds: list[int], n_folds: int) -> list[float]:
    """sbibm's protocol with :func:`_train_and_score`: the folds of set ``i`` are scikit-learn's
    ``KFold(n_folds, shuffle=True, random_state=seeds[i])`` (training rows in increasing order, as
    ``KFold`` gives them), its nets draw as ``MLPClassifier(random_state=seeds[i])``; the sets of
    each dimension are trained together."""
    scores: list[float] = [0.0] * len(sets)
    for dim in dict.fromkeys(data.shape[1] for data, _ in sets):
        members = [i for i, (data, _) in enumerate(sets) if data.shape[1] == dim]
        offsets = np.cumsum([0] + [len(sets[i][0]) for i in members]).tolist()
        jobs = []
        for i, offset in zip(members, offsets, strict=False):
            folds = [torch.from_numpy(f) + offset for f in _fold_indices(len(sets[i][0]), n_folds, seeds[i])]
            for k, test in enumerate(folds):
                train = torch.cat([f for j, f in enumerate(folds) if j != k]).sort().values.int()
                jobs.append(_Job(train, test, seeds[i]))
        data = torch.cat([sets[i][0] for i in members])
        labels = torch.cat([sets[i][1] for i in members])
        accuracies = _train_and_score(data, labels, jobs)
        for a, i in enumerate(members):
            fold_scores = accuracies[a * n_folds : (a + 1) * n_folds]
            scores[i] = float(np.mean(fold_scores).astype(np.float32))
    return scores
