"""The networks and training steps the speed benchmarks share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..distributions import StandardNormal
from ..freeform import FreeFormFlow
from ..jacobian import log_abs_det_jacobian
from ..nets import ResNet

BATCH = 256
BETA = 10.0
DEPTH, BLOCKS = 2, 2
#: The exact step holds ``batch * D`` tangent rows; above D = 128 it runs on this many samples
#: and its time is scaled to ``BATCH`` (linear in the batch at these sizes; stated in the tables).
EXACT_LARGE_D_BATCH = 32


def hidden(dim: int) -> int:
    """Hidden width of every residual branch at data dimension ``dim``: ``max(64, D)``."""
    return max(64, dim)


def flow(dim: int, surrogate: str = "vjp", seed: int = 0) -> FreeFormFlow:
    """Residual encoder and decoder (``ResNet(D, max(64, D), depth=2, blocks=2)``, default init:
    each starts as the identity), standard normal latent, beta = 10."""
    torch.manual_seed(seed)
    enc = ResNet(dim, hidden(dim), DEPTH, BLOCKS)
    dec = ResNet(dim, hidden(dim), DEPTH, BLOCKS)
    return FreeFormFlow(enc, dec, StandardNormal(dim), beta=BETA, surrogate=surrogate)


def exact_batch(dim: int, batch: int = BATCH) -> int:
    """The batch the exact-likelihood steps run on: ``batch`` up to D = 128, at most
    :data:`EXACT_LARGE_D_BATCH` above.

    Args:
        dim: the data dimension D.
        batch: the batch of the other variants.
    """
    return batch if dim <= 128 else min(batch, EXACT_LARGE_D_BATCH)


def loss_fn(variant: str, model: FreeFormFlow, x: Tensor) -> Callable[[], Tensor]:
    """The scalar training loss of one variant on batch ``x``.

    * ``fff`` / ``fff_jvp``: ``FreeFormFlow.loss`` with the ``vjp`` / ``jvp`` surrogate;
    * ``exact``: exact maximum likelihood, ``-log p_Z(f(x)) - log|det J_f(x)|`` with the full
      Jacobian (vmap of jacrev, differentiable in the parameters), plus the same reconstruction
      term ``beta ||x - g(f(x))||^2``, so that it trains the same parameters as ``fff``;
      ``exact_structured``: the same with the structured Jacobian of :mod:`freeflows.tangents`;
    * ``ae``: reconstruction only, ``||x - g(f(x))||^2`` (the floor).
    """
    if variant in ("fff", "fff_vjp"):
        model.surrogate = "vjp"
        return lambda: model.loss(x).value
    if variant == "fff_jvp":
        model.surrogate = "jvp"
        return lambda: model.loss(x).value
    if variant.startswith("exact"):
        # exact / exact_fwd: vmap(jacfwd); exact_rev: vmap(jacrev); exact_structured: the
        # structured forward pass of freeflows.tangents (jacobian_mode="auto" with the module)
        mode = {
            "exact": "forward",
            "exact_fwd": "forward",
            "exact_rev": "reverse",
            "exact_structured": "auto",
        }[variant]
        module = model.encoder if mode == "auto" else None

        def exact() -> Tensor:
            z = model.encode(x)
            log_det = log_abs_det_jacobian(model.encode, x, mode=mode, module=module)
            rec = (x - model.decode(z)).square().sum(dim=1)
            return (-model.latent.log_prob(z) - log_det + model.beta * rec).mean()

        return exact
    if variant == "ae":
        return lambda: (x - model.decode(model.encode(x))).square().sum(dim=1).mean()
    raise ValueError(f"unknown variant {variant!r}")


def train_step(variant: str, dim: int, batch: int = BATCH, seed: int = 0) -> Callable[[], None]:
    """One Adam step (default settings, lr 1e-4) of ``variant`` on a fixed Gaussian batch; every
    variant has its own copy of the same initial networks and its own optimiser."""
    model = flow(dim, seed=seed)
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1))
    loss = loss_fn(variant, model, x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    return step
