r"""Boltzmann-distributed particle systems: DW4 (4 particles in 2-D) and LJ13 (13 in 3-D).

Configurations are flattened particle-major, :math:`(x_1, y_1, x_2, y_2, \dots)`, and centred
(zero centre of mass). Both energies are at temperature 1, with :math:`d_{ij}` the distance
between particles :math:`i` and :math:`j`, summed over the unique pairs :math:`i < j`:

**DW4** (double well), :math:`a = 0`, :math:`b = -4`, :math:`c = 0.9`, :math:`d_0 = 4`:

.. math:: E(x) = \sum_{i<j} a (d_{ij} - d_0) + b (d_{ij} - d_0)^2 + c (d_{ij} - d_0)^4 .

**LJ13** (Lennard-Jones in a harmonic trap), :math:`\varepsilon = r_m = 1`:

.. math:: E(x) = \varepsilon \sum_{i<j} 2 \left[ (r_m/d_{ij})^{12} - 2 (r_m/d_{ij})^{6} \right]
   + \tfrac12 \sum_i \lVert x_i - \bar x \rVert^2 .

The factor 2 is the convention of the shipped data (the pair sum there runs over ordered pairs).

**Files** (``freeflows/data/files``, package data):

* ``train_split_DW4.npy`` (100000 x 8), ``val_split_DW4.npy`` (10000 x 8) and
  ``val_split_LJ13-1000.npy`` (10000 x 39): byte-identical copies of ``data/`` of the public
  repository jarridrb/DEM (MIT licence), commit 8e95319. The DW4 files are not centred; they are
  centred when loaded.
* ``train_mcmc_LJ13.npy`` (20000 x 39, float32): generated here by :func:`metropolis` with
  ``scripts/make_lj13_train.py`` (its docstring gives the seed and the procedure).

**Splits.** The test split of either system is fixed (it does not depend on ``seed``) and is
never used for training or model selection:

* DW4: train = the shipped training file (optionally a seeded random subset of ``n_train``
  rows); val = rows 0-4999 of the shipped validation file; test = rows 5000-9999 of it.
* LJ13: train = the MCMC file (optionally a seeded subset); val = rows 0-4999 of the shipped
  LJ13 file; test = rows 5000-9999 of it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..geometry import center, interparticle_distances
from .base import DataSet, Split
from .mcmc import MetropolisResult, metropolis

FILES = Path(__file__).parent / "files"

DW4_FILES = ("train_split_DW4.npy", "val_split_DW4.npy")
LJ13_FILES = ("train_mcmc_LJ13.npy", "val_split_LJ13-1000.npy")

__all__ = [
    "FILES",
    "MetropolisResult",
    "center",
    "dw4_energy",
    "lennard_jones_energy",
    "lj13_energy",
    "lj13_lattice",
    "load_dw4",
    "load_lj13",
    "metropolis",
]


def dw4_energy(x: Tensor, a: float = 0.0, b: float = -4.0, c: float = 0.9, d0: float = 4.0) -> Tensor:
    r"""Double-well energy of 4 particles in 2-D, ``[..., 8] -> [...]`` (see the module docstring)."""
    r = interparticle_distances(x, 4, 2) - d0
    return (a * r + b * r.square() + c * r.square().square()).sum(dim=-1)


def lj13_energy(x: Tensor, epsilon: float = 1.0, r_m: float = 1.0, trap: float = 1.0) -> Tensor:
    r"""Lennard-Jones energy of 13 particles in 3-D with a harmonic trap of strength ``trap``
    about the centre of mass, ``[..., 39] -> [...]`` (see the module docstring)."""
    return lennard_jones_energy(x, 13, 3, epsilon=epsilon, r_m=r_m, trap=trap)


def lennard_jones_energy(
    x: Tensor, n_particles: int, n_dims: int, epsilon: float = 1.0, r_m: float = 1.0, trap: float = 1.0
) -> Tensor:
    r""":math:`\varepsilon \sum_{i<j} 2[(r_m/d)^{12} - 2(r_m/d)^6] + \frac{\text{trap}}{2}
    \sum_i \lVert x_i - \bar x \rVert^2` for any number of particles."""
    inv6 = (r_m / interparticle_distances(x, n_particles, n_dims)).pow(6)
    pair = 2 * epsilon * (inv6.square() - 2 * inv6).sum(dim=-1)
    harmonic = 0.5 * trap * center(x, n_particles, n_dims).square().sum(dim=-1)
    return pair + harmonic


def lj13_lattice(
    n: int, spacing: float = 1.1, jitter: float = 0.05, generator: torch.Generator | None = None
) -> Tensor:
    """``n`` starting configurations for LJ13 MCMC: 13 distinct random sites of a 3x3x3 cubic
    lattice of the given spacing, jittered, centred; ``[n, 39]`` in float64."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(3.0),) * 3, indexing="ij"), -1).reshape(27, 3)
    sites = torch.rand(n, 27, generator=generator).argsort(dim=1)[:, :13]
    p = grid.double()[sites] * spacing
    p = p + jitter * torch.randn(p.shape, generator=generator, dtype=p.dtype)
    return center(p.reshape(n, 39), 13, 3)


def _load(name: str) -> Tensor:
    path = FILES / name
    if not path.exists():
        raise FileNotFoundError(f"particle data file {path} is missing; reinstall freeflows")
    return torch.from_numpy(np.load(path)).to(torch.float32)


def _subset(x: Tensor, n: int | None, seed: int) -> Tensor:
    if n is None:
        return x
    if not 1 <= n <= x.shape[0]:
        raise ValueError(f"n_train must be between 1 and {x.shape[0]}, got {n}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return x[perm[:n]]


def _particles(
    name: str,
    train: Tensor,
    heldout: Tensor,
    n_particles: int,
    n_dims: int,
    energy: Callable[[Tensor], Tensor],
    seed: int,
    n_train: int,
) -> DataSet:
    train = center(_subset(train, n_train, seed), n_particles, n_dims)
    heldout = center(heldout, n_particles, n_dims)
    half = heldout.shape[0] // 2
    return DataSet(
        name=name,
        train=Split(train),
        val=Split(heldout[:half]),
        test=Split(heldout[half:]),
        event_shape=(n_particles * n_dims,),
        kind="particles",
        meta={"n_particles": n_particles, "n_dims": n_dims, "energy": energy},
    )


def load_dw4(seed: int = 0, n_train: int | None = None) -> DataSet:
    """DW4 as a :class:`DataSet` (float32, centred). ``n_train`` takes a random subset of the
    100000 training rows, chosen by ``seed``; val and test are fixed (see the module docstring)."""
    train, heldout = (_load(f) for f in DW4_FILES)
    return _particles("dw4", train, heldout, 4, 2, dw4_energy, seed, n_train)


def load_lj13(seed: int = 0, n_train: int | None = None) -> DataSet:
    """LJ13 as a :class:`DataSet` (float32, centred). Train is the MCMC file (``n_train`` takes a
    seeded random subset of its 20000 rows); val and test halve the shipped file."""
    train, heldout = (_load(f) for f in LJ13_FILES)
    return _particles("lj13", train, heldout, 13, 3, lj13_energy, seed, n_train)
