r"""The baseline for SBI tasks: neural posterior estimation (NPE) with a neural spline flow.

NPE fits a conditional density :math:`q_\phi(\theta \mid x)` by maximum likelihood on simulated
pairs, :math:`\max_\phi \sum_i \log q_\phi(\theta_i \mid x_i)`, which for
:math:`(\theta_i, x_i) \sim p(\theta)\,p(x \mid \theta)` targets the posterior
:math:`p(\theta \mid x)`. The flow is the ``sbi`` package's neural spline flow (the version
sbibm pins, ``sbi<0.22``) with sbibm's NPE settings: 5 rational-quadratic spline transforms
with 10 bins, 50 hidden features, z-scoring of :math:`\theta` and :math:`x`, Adam at
:math:`5\cdot 10^{-4}`, early stopping after 20 epochs without a better validation loss (on a
held-out tenth). As in sbibm, samples outside the prior's support are rejected.

The point of this module is a fair comparison: :func:`train_npe_on_dataset` trains on exactly the
simulations of a :func:`freeflows.data.sbi.load_sbi_task` data set (its train and validation
splits, mapped back to the original scale). ``sbi`` is imported only inside the functions.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.base import DataSet
from ..data.sbi import get_task


def _import_sbi() -> Any:
    try:
        from sbi import inference
        from sbi.utils import posterior_nn
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the NPE baseline needs sbi; install it with `pip install -e .[sbi]`") from error
    return inference, posterior_nn


class NPEPosterior:
    r"""A trained NPE posterior :math:`q(\theta \mid x)` on the original scale of ``task``."""

    def __init__(self, posterior: Any, task: str, epochs: int):
        self.posterior = posterior
        self.task = task
        #: Training epochs that sbi ran before early stopping.
        self.epochs = epochs

    def sample(self, n: int, x: Tensor, seed: int = 0) -> Tensor:
        r"""``n`` draws :math:`\theta \sim q(\theta \mid x)` ``[n, dim_theta]``; ``x`` is ``[dim_x]``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            samples = self.posterior.sample((n,), x=x.reshape(1, -1), show_progress_bars=False)
        return samples.detach().reshape(n, -1)

    def log_prob(self, theta: Tensor, x: Tensor) -> Tensor:
        r""":math:`\log q(\theta \mid x)` ``[B]`` (renormalised to the prior's support by sbi)."""
        return self.posterior.log_prob(theta, x=x.reshape(1, -1)).detach()


def train_npe(
    task: str,
    theta: Tensor,
    x: Tensor,
    *,
    seed: int = 0,
    hidden_features: int = 50,
    num_transforms: int = 5,
    training_batch_size: int = 50,
    learning_rate: float = 5e-4,
    validation_fraction: float = 0.1,
    stop_after_epochs: int = 20,
    max_num_epochs: int = 2**31 - 1,
    log_dir: Path | None = None,
) -> NPEPosterior:
    r"""Train NPE with a neural spline flow on simulations ``theta [N, dim_theta]``, ``x [N, dim_x]``.

    Both are on the original scale (sbi z-scores them itself). ``seed`` fixes the network's
    initialisation, sbi's validation split and the batch order. The prior of ``task`` (from sbibm)
    bounds the support of the posterior. sbi's tensorboard summary goes to ``log_dir`` (a
    temporary folder, removed afterwards, if ``None``), never to the working directory.
    """
    if theta.dim() != 2 or x.dim() != 2 or theta.shape[0] != x.shape[0]:
        raise ValueError(
            f"theta and x must be [N, .] with the same N, got {tuple(theta.shape)}, {tuple(x.shape)}"
        )
    inference, posterior_nn = _import_sbi()
    prior = get_task(task).get_prior_dist()
    build = posterior_nn(
        model="nsf",
        hidden_features=hidden_features,
        num_transforms=num_transforms,
        z_score_theta="independent",
        z_score_x="independent",
    )
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        writer = SummaryWriter(str(log_dir if log_dir is not None else scratch))
        method = inference.SNPE_C(
            prior=prior, density_estimator=build, show_progress_bars=False, summary_writer=writer
        )
        estimator = method.append_simulations(theta.float(), x.float()).train(
            training_batch_size=min(training_batch_size, theta.shape[0]),
            learning_rate=learning_rate,
            validation_fraction=validation_fraction,
            stop_after_epochs=stop_after_epochs,
            max_num_epochs=max_num_epochs,
        )
        posterior = method.build_posterior(estimator)
        writer.close()
    epochs = int(method.summary.get("epochs_trained", [0])[-1]) if hasattr(method, "summary") else 0
    return NPEPosterior(posterior, task, epochs)


def train_npe_on_dataset(data: DataSet, **kwargs: Any) -> NPEPosterior:
    r"""NPE on the train and validation simulations of a :func:`~freeflows.data.sbi.load_sbi_task`
    data set, mapped back to the original scale; ``kwargs`` go to :func:`train_npe`.

    sbi holds out its own validation tenth of these for early stopping, so NPE sees the same
    simulations as a model trained on ``data.train`` with early stopping on ``data.val``.
    """
    meta = data.meta
    if "theta_standardizer" not in meta or "task" not in meta:
        raise ValueError("train_npe_on_dataset needs a data set from freeflows.data.sbi.load_sbi_task")
    theta_std, x_std = meta["theta_standardizer"], meta["x_standardizer"]
    theta = theta_std.inverse(torch.cat([data.train.x, data.val.x]))
    x = x_std.inverse(torch.cat([data.train.c, data.val.c]))
    kwargs.setdefault("seed", meta.get("seed", 0))
    return train_npe(meta["task"], theta, x, **kwargs)
