"""The Lightning module that trains any model with the contract ``loss``/``log_prob``/``sample``.

It knows nothing of the model's kind. Optional hooks a model may offer:

* ``diagnostics(x, c, log_prob=...) -> dict`` of extra validation metrics (free-form flows
  report ``reconstruction`` and ``log_prob_gap``);
* ``inverse_defect(x, c, probes=..., generator=...) -> Tensor`` per row, logged as
  ``val/inverse_defect`` (batch mean; free-form flows: ``||J_g J_f - I||_F^2``) and
  ``val/inverse_defect_per_dim`` (divided by the latent's dimension,
  :func:`freeflows.eval.metrics.density_dimension`);
* ``divergence_hint`` (str): what to change when training diverges.

Every training step reseeds torch's global generator from (seed, step, rank): the randomness
of a step does not depend on what ran before it, which makes resume exact.

Optimisation is manual so that a non-finite loss or gradient skips the batch on every rank
(the decision is reduced across processes, so DDP ranks never disagree). A
:class:`~freeflows.contract.NumericalError` from ``loss`` (for example a failed ODE solve) counts
as a non-finite loss.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..contract import NumericalError
from ..eval.metrics import density_dimension
from .callbacks import DivergenceError
from .data import unpack


def make_scheduler(
    optimizer: torch.optim.Optimizer, optim_cfg: dict[str, Any], max_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule: ``constant``, ``cosine`` (to zero) or ``onecycle``, each
    with an optional linear warm-up; ``schedule_steps`` defaults to the run's step count
    (:func:`freeflows.runner.train.training_steps`)."""
    total = optim_cfg.get("schedule_steps") or max_steps
    warmup = optim_cfg.get("warmup_steps") or 0
    kind = optim_cfg["schedule"]
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, optim_cfg["lr"], total_steps=total + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class FlowModule(L.LightningModule):
    """Trains a model through its ``loss`` with Adam and a per-step schedule, skipping batches whose
    loss or gradient is non-finite, and validates it by ``log_prob`` (see the module docstring).

    Args:
        model: any model with the contract's ``loss`` and ``log_prob``.
        optim_cfg: the config's ``optim`` section (``lr``, ``weight_decay``, ``grad_clip``, the schedule).
        max_steps: the run's number of optimiser steps, the schedule's length by default.
        max_nonfinite: batches in a row with a non-finite loss or gradient before a
            :class:`~freeflows.runner.callbacks.DivergenceError`.
        seed: the run's seed, from which every step's and validation batch's randomness is drawn.
    """
    def __init__(
        self,
        model: nn.Module,
        optim_cfg: dict[str, Any],
        max_steps: int,
        max_nonfinite: int = 20,
        seed: int = 0,
    ):
        super().__init__()
        self.seed = seed
        self.model = model
        self.optim_cfg = optim_cfg
        self.max_steps = max_steps
        self.max_nonfinite = max_nonfinite
        self.automatic_optimization = False
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.train_seconds = 0.0
        self._t0: float | None = None

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """Adam over the model's parameters, with :func:`make_scheduler` stepped every step."""
        opt = torch.optim.Adam(
            self.model.parameters(), lr=self.optim_cfg["lr"], weight_decay=self.optim_cfg["weight_decay"]
        )
        return {
            "optimizer": opt,
            "lr_scheduler": {
                "scheduler": make_scheduler(opt, self.optim_cfg, self.max_steps),
                "interval": "step",
            },
        }

    def _any_rank(self, flag: bool) -> bool:
        value = torch.tensor(float(flag), device=self.device)
        return bool(self.trainer.strategy.reduce(value, reduce_op="sum") > 0)

    def _skip(self, what: str) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        rank_zero_warn(f"non-finite {what} at step {self.global_step}; batch skipped")
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            hint = getattr(self.model, "divergence_hint", None) or "lower optim.lr or optim.grad_clip"
            raise DivergenceError(
                f"training diverged: {self.nonfinite_in_a_row} batches in a row had a non-finite {what} "
                f"(last at step {self.global_step}). The last good checkpoint is kept in checkpoints/. "
                f"Likely fix: {hint}."
            )

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        """One manual optimisation step on the model's loss, reseeded from (seed, step, rank), skipping
        the batch on every rank if the loss or a gradient is non-finite."""
        x, c = unpack(batch)
        # The step's random draws (Hutchinson probes, ...) depend only on (seed, step, retry, rank),
        # so a resumed run draws exactly what the uninterrupted run drew. A skipped batch does not
        # advance the step, so the retry count keeps the next batch from reusing its draws. (torch's
        # CPU generator keeps only the low 32 bits of a seed: the retry term is an odd constant
        # times the count, so it moves those bits.)
        retry = self.nonfinite_in_a_row * 0x9E3779B1
        torch.manual_seed((self.seed * 1_000_003 + self.global_step) * 64 + self.global_rank + retry)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        try:
            loss = self.model.loss(x, c)
        except NumericalError as err:  # e.g. a failed ODE solve: the batch has no finite loss
            rank_zero_warn(f"step {self.global_step}: {err}")
            loss = None
        # every rank joins the same reductions, whether or not its own batch failed
        if self._any_rank(loss is None or not torch.isfinite(loss.value).item()):
            self._skip("loss")
            return None
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss.value)
        grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in self.model.parameters())
        if self._any_rank(not grads_ok):
            opt.zero_grad(set_to_none=True)
            self._skip("gradient")
            return None
        if self.optim_cfg.get("grad_clip"):
            self.clip_gradients(
                opt, gradient_clip_val=self.optim_cfg["grad_clip"], gradient_clip_algorithm="norm"
            )
        opt.step()
        sched.step()
        self.nonfinite_in_a_row = 0
        self.log("loss", loss.value.detach(), prog_bar=True, on_step=True, on_epoch=False)
        for key, value in loss.parts.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False)
        self.log("lr", sched.get_last_lr()[0], on_step=True, on_epoch=False)
        return None

    # -- validation -----------------------------------------------------------------------------
    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        """Log ``val/nll`` (over rows whose ``log_prob`` is not NaN), ``val/unsolved`` and the model's
        optional diagnostics and ``val/inverse_defect``."""
        x, c = unpack(batch)
        extra = {}
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # A free-form flow's log_prob is NaN where its root solve fails; counted below.
                warnings.simplefilter("ignore", RuntimeWarning)
                log_prob = self.model.log_prob(x, c).detach()
                if hasattr(self.model, "diagnostics"):
                    extra = self.model.diagnostics(x, c, log_prob=log_prob)
                if hasattr(self.model, "inverse_defect"):  # ||J_g J_f - I||_F^2, batch mean
                    probes = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + batch_idx)
                    defect = self.model.inverse_defect(x, c, probes=4, generator=probes)
                    extra["inverse_defect"] = defect.mean()
                    dims = density_dimension(self.model, x.shape[1:])
                    extra["inverse_defect_per_dim"] = extra["inverse_defect"] / dims
        except NumericalError as err:  # an infinite val/nll never becomes the best checkpoint
            rank_zero_warn(f"validation at step {self.global_step}: {err}")
            log_prob, extra = torch.full((x.shape[0],), -math.inf, device=x.device), {}
        unsolved = torch.isnan(log_prob)
        extra = {**extra, "unsolved": unsolved.float().mean()}
        nll = -log_prob.nanmean() if not bool(unsolved.all()) else log_prob.new_tensor(math.inf)
        self.log("val/nll", nll, prog_bar=True, sync_dist=True)
        for key, value in extra.items():
            self.log(f"val/{key}", value, sync_dist=True)

    # -- bookkeeping ----------------------------------------------------------------------------
    def on_train_start(self) -> None:
        """Start the training clock."""
        self._t0 = time.perf_counter()

    def _elapsed(self) -> float:
        return self.train_seconds + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def on_train_end(self) -> None:
        """Add this session's time to :attr:`train_seconds` and stop the clock."""
        self.train_seconds = self._elapsed()
        self._t0 = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the training time and the non-finite batch counts under ``checkpoint["freeflows"]``."""
        checkpoint["freeflows"] = {
            "train_seconds": self._elapsed(),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the training time and the non-finite batch counts on resume."""
        state = checkpoint.get("freeflows", {})
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
