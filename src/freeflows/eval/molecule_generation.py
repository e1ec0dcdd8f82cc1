r"""Generating molecules with a model of the molecule data set (``data.kind == "molecules"``) and
scoring them with EDM's metrics (:func:`freeflows.eval.molecules.molecule_metrics`).

A molecule is generated in two steps: its atom count :math:`n` is drawn from the training
molecules' histogram, then the model draws ``sample(1, c=n)``; positions are the first three
channels and atom types the argmax of the one-hot channels
(:meth:`~freeflows.point_clouds.AtomEncoding.decode`). The speed is CPU time (``process_time``)
of the draws alone, so ``molecules_per_second`` and ``stable_molecules_per_second`` (molecules
per second times molecule stability) compare models measured on the same machine and threads.

The same metrics on as many test molecules (``data_atom_stability``, ...) say how far the data
itself is from 100 % under the bond-length rules.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from ..data.base import DataSet


def draw_counts(histogram: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` atom counts drawn from a histogram (index = count).

    Args:
        histogram: ``[N + 1]`` shares (any non-negative weights).
        n: draws.
        generator: random number generator.

    Returns:
        ``[n]`` int64.

    Example:
        >>> import torch
        >>> draw_counts(torch.tensor([0.0, 0.0, 1.0]), 3).tolist()
        [2, 2, 2]
    """
    return torch.multinomial(histogram.double(), n, replacement=True, generator=generator)


def generate(
    model: nn.Module, data: DataSet, n: int, batch_size: int = 500, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Generate ``n`` molecules (see the module docstring).

    Args:
        model: a model of the molecule data set.
        data: the data set (``meta`` gives the histogram and the encoding).
        n: molecules.
        batch_size: molecules per ``sample`` call.
        seed: seed of the counts and of the draws.

    Returns:
        ``(positions [n, N, 3], types [n, N], mask [n, N], seconds)``, seconds of CPU time
        spent in ``sample``.
    """
    gen = torch.Generator().manual_seed(seed)
    counts = draw_counts(data.meta["count_histogram"], n, gen)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    draws, seconds = [], 0.0
    for part in counts.split(batch_size):
        c = part.to(device=device, dtype=dtype).unsqueeze(1)
        start = time.process_time()
        with torch.no_grad():
            x = model.sample(1, c)[0]
        seconds += time.process_time() - start
        draws.append(x.cpu().float())
    x = torch.cat(draws)
    d = int(data.meta["n_dims"])
    mask = torch.arange(x.shape[1]) < counts.unsqueeze(1)
    types = data.meta["encoding"].decode(x[..., d:], mask)
    return x[..., :d], types, mask, seconds


def molecule_generation_metrics(
    model: nn.Module, data: DataSet, n: int, batch_size: int = 500
) -> dict[str, Any]:
    """EDM's metrics of ``n`` generated molecules, their speed, and the data row on ``n`` test
    molecules (or all of them when fewer).

    Args:
        model: a model of the molecule data set.
        data: the data set.
        n: molecules to generate.
        batch_size: molecules per ``sample`` call.

    Returns:
        ``atom_stability``, ``molecule_stability``, ``validity``, ``uniqueness``, ``novelty``,
        ``n_generated``, ``generate_cpu_seconds``, ``molecules_per_second``,
        ``stable_molecules_per_second`` and ``data_*`` for the test molecules.
    """
    from .molecules import molecule_metrics

    train_smiles = data.meta.get("train_smiles")
    out: dict[str, Any] = {}
    if n > 0:
        positions, types, mask, seconds = generate(model, data, n, batch_size)
        scores = molecule_metrics(positions, types, mask, train_smiles=train_smiles)
        out.update({k: v for k, v in scores.items() if k != "n_molecules"})
        rate = n / seconds if seconds > 0 else math.nan
        out.update(
            n_generated=n,
            generate_cpu_seconds=seconds,
            molecules_per_second=rate,
            stable_molecules_per_second=rate * scores["molecule_stability"],
        )
    rows = min(max(n, 1), data.meta["test_types"].shape[0])
    real = molecule_metrics(
        data.meta["test_positions"][:rows], data.meta["test_types"][:rows], train_smiles=train_smiles
    )
    out.update({f"data_{k}": v for k, v in real.items() if k != "n_molecules"})
    out["data_n_molecules"] = rows
    return out


def count_log_prob(data: DataSet, c: Tensor) -> Tensor:
    r""":math:`\log p(n)` of each row's atom count under the training histogram.

    Args:
        data: the data set.
        c: conditions ``[M, 1]``.

    Returns:
        ``[M]`` float64.
    """
    hist = data.meta["count_histogram"].double()
    return hist[c[:, -1].round().long().cpu()].log()


def molecule_nll_metrics(log_q: Tensor, data: DataSet, c: Tensor) -> dict[str, Any]:
    r"""What the test NLL of a molecule model means, and two values built on it.

    ``log_q`` is :math:`\log q(x, h \mid n)` per test molecule, with respect to the Lebesgue
    measure of each molecule's :math:`(n-1) \cdot 3 + nk`-dimensional subspace (positions in
    ångström, dequantised feature channels). ``test_nll_joint`` is the mean of
    :math:`-\log q(x, h \mid n) - \log p(n)` under the training histogram of atom counts, the
    distribution that generation draws :math:`n` from; ``test_nll_types_bound`` further
    subtracts the log-volume of the dequantisation boxes, an upper bound on
    :math:`-\log P(x, \text{types}, n)`, the discrete types' NLL. Both average the rows where
    ``log_q`` is finite (not NaN: the root solve converged) and :math:`p(n) > 0`;
    ``test_nll_joint_rows`` counts them. A test molecule whose atom count never occurs in the
    training split has probability zero under the model; ``test_nll_unseen_counts`` counts those.

    Args:
        log_q: ``[M]`` log-densities of the test rows (NaN where unsolved).
        data: the data set.
        c: the test rows' conditions ``[M, 1]``.

    Returns:
        ``nll_density`` (a description), ``nll_dims`` (mean degrees of freedom),
        ``test_nll_joint``, ``test_nll_types_bound``, ``test_nll_joint_rows`` and
        ``test_nll_unseen_counts``.
    """
    n = c[:, -1].double().cpu()
    k = int(data.event_shape[1]) - int(data.meta["n_dims"])
    dims = (n - 1) * data.meta["n_dims"] + n * k
    log_n = count_log_prob(data, c)
    log_q = log_q.detach().double().cpu()
    rows = torch.isfinite(log_q) & torch.isfinite(log_n)
    joint = bound = float("nan")
    if bool(rows.any()):
        joint = float(-(log_q + log_n)[rows].mean())
        bound = joint - float(data.meta["encoding"].log_volume(n)[rows].mean())
    return {
        "nll_density": "-log q(x, h | n) per molecule on its (n-1)*3+n*k-dim subspace (decoder density "
        "for the free-form flow), dequantised features",
        "nll_dims": float(dims.mean()),
        "test_nll_joint": joint,
        "test_nll_types_bound": bound,
        "test_nll_joint_rows": int(rows.sum()),
        "test_nll_unseen_counts": int((~torch.isfinite(log_n)).sum()),
    }
