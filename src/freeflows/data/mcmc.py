r"""Random-walk Metropolis sampling of a Boltzmann density :math:`p(x) \propto e^{-E(x)}`,
vectorised over independent chains, with per-chain step-size adaptation during burn-in.

Each chain :math:`c` proposes :math:`x' = x + \sigma_c\,\xi`, :math:`\xi \sim \mathcal N(0, I)`, and
accepts with probability :math:`\min(1, e^{-(E(x') - E(x))})`. The proposal is symmetric, so the
chain leaves :math:`p` invariant.

**Step adaptation.** During the first ``burn_in`` steps the log step size of every chain follows a
Robbins–Monro update towards the target acceptance rate :math:`a^\*`,

.. math:: \log \sigma_c \leftarrow \log \sigma_c + \gamma\,(\alpha_c - a^\*),

where :math:`\alpha_c \in \{0, 1\}` says whether the chain's proposal was accepted. After burn-in
the step sizes are frozen, so the kept samples come from a valid (non-adaptive) Markov chain.

**Particle systems.** With ``n_particles`` given, the proposal noise is made mean-free (its
centre of mass is subtracted), so the moves stay in the zero-centre-of-mass subspace where a
translation-invariant energy has a normalisable density. This proposal is still symmetric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..geometry import center


@dataclass
class MetropolisResult:
    """The output of :func:`metropolis`.

    Attributes:
        samples: kept states after burn-in, every ``thin`` steps: ``[n_kept, chains, D]``.
        energies: their energies, ``[n_kept, chains]``.
        acceptance: per-chain acceptance rate after burn-in, ``[chains]``.
        step: per-chain frozen step sizes, ``[chains]``.
        last: the final state of every chain, ``[chains, D]``.
    """

    samples: Tensor
    energies: Tensor
    acceptance: Tensor
    step: Tensor
    last: Tensor


@torch.no_grad()
def metropolis(
    energy: Callable[[Tensor], Tensor],
    x0: Tensor,
    n_steps: int,
    *,
    burn_in: int = 0,
    thin: int = 1,
    step: float = 0.1,
    target_accept: float = 0.3,
    adapt_rate: float = 0.05,
    n_particles: int | None = None,
    generator: torch.Generator | None = None,
) -> MetropolisResult:
    """Run ``x0.shape[0]`` Metropolis chains for ``burn_in + n_steps`` steps.

    Args:
        energy: batched energy ``[C, D] -> [C]`` (the negative log-density up to a constant).
        x0: initial states ``[C, D]``, one per chain.
        n_steps: steps after burn-in; every ``thin``-th state is kept.
        burn_in: steps of adaptation whose states are discarded.
        step: initial proposal standard deviation of every chain.
        target_accept: acceptance rate the adaptation aims for.
        adapt_rate: :math:`\\gamma`, the Robbins–Monro gain on the log step size.
        n_particles: if given, proposals are centred over that many particles (``D`` must be a
            multiple of it).
        generator: random generator, for reproducible chains.
    """
    if x0.dim() != 2:
        raise ValueError(f"x0 must be [chains, D], got shape {tuple(x0.shape)}")
    if n_steps < 1 or burn_in < 0 or thin < 1:
        raise ValueError(f"need n_steps >= 1, burn_in >= 0, thin >= 1; got {n_steps}, {burn_in}, {thin}")
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
    chains, dim = x0.shape
    if n_particles is not None and dim % n_particles != 0:
        raise ValueError(f"D={dim} is not a multiple of n_particles={n_particles}")
    kw = {"device": x0.device, "dtype": x0.dtype, "generator": generator}

    x = x0.clone()
    e = energy(x)
    log_step = torch.full((chains,), float(step), device=x0.device, dtype=x0.dtype).log()
    accepted = torch.zeros(chains, device=x0.device, dtype=x0.dtype)
    kept_x, kept_e = [], []
    for t in range(burn_in + n_steps):
        noise = torch.randn(chains, dim, **kw)
        if n_particles is not None:
            noise = center(noise, n_particles, dim // n_particles)
        proposal = x + log_step.exp()[:, None] * noise
        e_new = energy(proposal)
        log_u = torch.rand(chains, **kw).log()
        # NaN energies (e.g. overlapping particles) are rejected.
        accept = (log_u < e - e_new) & torch.isfinite(e_new)
        x = torch.where(accept[:, None], proposal, x)
        e = torch.where(accept, e_new, e)
        if t < burn_in:
            log_step = log_step + adapt_rate * (accept.to(x.dtype) - target_accept)
        else:
            accepted += accept.to(x.dtype)
            if (t - burn_in + 1) % thin == 0:
                kept_x.append(x.clone())
                kept_e.append(e.clone())
    return MetropolisResult(
        samples=torch.stack(kept_x),
        energies=torch.stack(kept_e),
        acceptance=accepted / n_steps,
        step=log_step.exp(),
        last=x,
    )
