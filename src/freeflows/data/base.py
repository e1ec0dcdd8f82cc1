"""The data-set interface of the tool: fixed train/validation/test splits of tensors.

Every data set in ``freeflows.data`` is returned as a :class:`DataSet`. The runner only uses
this interface, so any source (toy samplers, particle files, simulators) plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Split:
    """One split: data ``x`` of shape ``[N, *event]`` and optional conditions ``c`` ``[N, C]``."""

    x: Tensor
    c: Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class DataSet:
    """Train, validation and test splits, fixed by the seed that made them.

    Attributes:
        name: the data set's name.
        event_shape: shape of one data point.
        condition_dim: number of condition features, ``None`` when unconditional.
        true_log_prob: exact log-density of the data distribution, when known
            (``fn(x, c=None) -> [N]``), so that KL to the truth can be reported.
        kind: ``"vector"``, ``"particles"`` or ``"image"``; tells plots and metrics what to draw.
        meta: anything else a metric or plot needs (for example ``n_particles``, ``energy``).
        wrap_model: applied by the runner to every model built for this data set, for example
            :class:`~freeflows.standardized.StandardizedModel` for a user's file, whose splits
            stay in the file's units while the model learns standardised values.
    """

    name: str
    train: Split
    val: Split
    test: Split
    event_shape: tuple[int, ...]
    condition_dim: int | None = None
    true_log_prob: Callable[..., Tensor] | None = None
    kind: str = "vector"
    meta: dict[str, Any] = field(default_factory=dict)
    wrap_model: Callable[[nn.Module], nn.Module] | None = None


def split_by_seed(
    x: Tensor, c: Tensor | None, fractions: tuple[float, float], seed: int
) -> tuple[Split, Split, Split]:
    """Shuffle rows with ``seed`` and cut them into train/val/test by ``(val, test)`` fractions."""
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    idx = (perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test])
    return tuple(Split(x[i], None if c is None else c[i]) for i in idx)  # type: ignore[return-value]
