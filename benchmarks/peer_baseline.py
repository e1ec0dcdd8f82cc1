"""Side-by-side training of density models at an exact budget, for the peer comparisons.

The models compared (a preset's free-form flow, freeflows' classic flows, and zuko's flows as
external baselines) are trained by one small plain-torch loop, not the Lightning runner, so that
the budget is exact and the same for all:

* **equal CPU time**: every model gets the same ``time.process_time()`` budget. The models are
  interleaved: each trains for a slice of CPU time in turn (round-robin), so that machine noise
  (a loaded, shared machine) falls on all of them alike. Only the training steps are timed.
* **equal steps**: every model takes the same number of optimiser steps (also interleaved).

Every model sees the same batches (the same index draws from the training split), Adam with the
same peak learning rate, the same one-cycle schedule as a function of *budget progress*
:math:`p` (the fraction of the CPU budget, or of the steps, used so far), the same gradient-norm
clip, and no selection on validation (the final weights are evaluated, for every model). The
one-cycle shape is that of ``torch.optim.lr_scheduler.OneCycleLR`` with its defaults (warm-up
over the first 30 %, cosine from ``lr/25`` up to ``lr`` and then down to ``lr/25/1e4``), without
its momentum cycling; it is written in :math:`p` because with a CPU budget the step count is not
known in advance.

zuko is an optional benchmark dependency (``pip install 'freeflows[bench]'``); it is imported
only when a zuko model is built.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

LogProb = Callable[[Tensor], Tensor]


@dataclass
class Density:
    """One log-density a model reports: ``fn(x) -> [N]``, with whether it is normalised."""

    fn: LogProb
    normalised: bool
    note: str = ""


@dataclass
class Contender:
    """A model in the comparison.

    Attributes:
        name: its label in the tables.
        model: the module whose parameters are trained.
        loss: ``loss(x) -> scalar`` to minimise on a batch.
        densities: label -> :class:`Density`; the first normalised one ranks the model.
        note: anything a reader must know about it (options, what was changed).
    """

    name: str
    model: nn.Module
    loss: Callable[[Tensor], Tensor]
    densities: dict[str, Density]
    note: str = ""


class ZukoDensity(nn.Module):
    """A zuko lazy flow (``zuko.flows.NSF``, ``MAF``, ...) seen as a density model: ``log_prob(x)``
    is the log-density of the flow's unconditional distribution."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, x: Tensor) -> Tensor:
        return self.flow().log_prob(x)


def zuko_contender(kind: str, features: int) -> Contender:
    """zuko's ``NSF`` or ``MAF`` with zuko's default settings, trained by maximum likelihood."""
    import zuko

    cls = {"nsf": zuko.flows.NSF, "maf": zuko.flows.MAF}[kind]
    model = ZukoDensity(cls(features))
    return Contender(
        name=f"zuko {kind.upper()}",
        model=model,
        loss=lambda x: -model.log_prob(x).mean(),
        densities={"log_prob": Density(model.log_prob, normalised=True)},
        note=f"zuko.flows.{kind.upper()}({features}), zuko's defaults",
    )


def exact_flow_contender(name: str, model: nn.Module, note: str = "") -> Contender:
    """A freeflows exact flow (RealNVP, MAF, ...), trained by maximum likelihood."""
    return Contender(
        name=name,
        model=model,
        loss=lambda x: -model.log_prob(x).mean(),
        densities={"log_prob": Density(model.log_prob, normalised=True)},
        note=note,
    )


def supports_paper_variant(flow: nn.Module) -> bool:
    """Whether ``flow.log_prob`` takes ``variant="paper"`` (the normalised free-form density is
    then the default ``log_prob``)."""
    x = torch.zeros(1, *flow.event_shape)
    try:
        flow.log_prob(x, variant="paper")
    except (ValueError, TypeError):
        return False
    return True


def fff_densities(flow: nn.Module) -> dict[str, Density]:
    """The free-form flow's densities: the default ``log_prob`` (normalised, when the flow has the
    ``"paper"`` variant) and the paper's value log p_Z(f(x)) − log|det J_g(f(x))| (not normalised)."""
    if supports_paper_variant(flow):
        return {
            "log_prob": Density(flow.log_prob, normalised=True, note="normalised (solve g(z) = x)"),
            "paper": Density(
                lambda x: flow.log_prob(x, variant="paper"), normalised=False, note="not normalised"
            ),
        }
    # An older freeflows: the default is the paper's formula, which is not normalised.
    return {"paper": Density(flow.log_prob, normalised=False, note="not normalised")}


def fff_contender(
    name: str,
    flow: nn.Module,
    cycle: float = 0.0,
    cycle_space: str = "latent",
    decoder_nll: float = 0.0,
    decoder_nll_rows: int = 128,
    note: str = "",
) -> Contender:
    r"""The free-form flow with its own loss ``flow.loss(x).value``, plus optional training terms
    that aim at the density of its draws (issue 14 item 7):

    * ``cycle`` :math:`\lambda > 0`: a cycle term on latent draws :math:`z \sim p_Z` (as many as
      the batch), :math:`\lambda\,\lVert f(g(z)) - z\rVert^2` (``cycle_space="latent"``) or the
      reconstruction error of the model's own draws :math:`\lambda\,\lVert g(f(g(z))) -
      g(z)\rVert^2` (``"data"``). Both make the decoder invert the encoder where ``sample()``
      puts its mass, so that the paper's value :math:`\log p_Z(f(x)) - \log\lvert\det
      J_g(f(x))\rvert` and the density of the draws agree there;
    * ``decoder_nll`` :math:`\mu > 0`: :math:`\mu` times the mean negative normalised
      log-density of the draws' distribution, :math:`-\log p_Z(z^*) + \log\lvert\det
      J_g(z^*)\rvert` with :math:`g(z^*) = x`, on the first ``decoder_nll_rows`` rows of the batch
      (``flow.log_prob`` with gradients: the root is differentiated implicitly). Rows whose solve
      fails are left out of the term. This trains the decoder's pushforward by maximum likelihood,
      the quantity that is evaluated.

    Gradients flow into both networks. Squared norms are summed over dimensions, averaged over
    the batch.
    """
    if cycle_space not in ("latent", "data"):
        raise ValueError(f"cycle_space must be 'latent' or 'data', got {cycle_space!r}")

    def loss(x: Tensor) -> Tensor:
        value = flow.loss(x).value
        if cycle > 0:
            z = flow.latent.sample(x.shape[0]).to(x)
            x_gen = flow.decode(z)
            z_back = flow.encode(x_gen)
            if cycle_space == "latent":
                err = (z_back - z).reshape(x.shape[0], -1).square().sum(1)
            else:
                err = (flow.decode(z_back) - x_gen).reshape(x.shape[0], -1).square().sum(1)
            value = value + cycle * err.mean()
        if decoder_nll > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # failed rows are NaN, left out
                log_q = flow.log_prob(x[:decoder_nll_rows])
            ok = torch.isfinite(log_q)
            if bool(ok.any()):
                value = value - decoder_nll * log_q[ok].mean()
        return value

    return Contender(name=name, model=flow, loss=loss, densities=fff_densities(flow), note=note)


def one_cycle_lr(progress: float, lr: float, pct_start: float = 0.3) -> float:
    r"""Learning rate at budget progress :math:`p \in [0, 1]`: cosine from ``lr/25`` to ``lr`` over
    :math:`p < 0.3`, then cosine down to ``lr/25/1e4`` (``OneCycleLR``'s defaults, in :math:`p`)."""
    p = min(max(progress, 0.0), 1.0)
    start, end = lr / 25.0, lr / 25.0 / 1e4
    if p < pct_start:
        return start + (lr - start) * (1 - math.cos(math.pi * p / pct_start)) / 2
    q = (p - pct_start) / (1 - pct_start)
    return end + (lr - end) * (1 + math.cos(math.pi * q)) / 2


@dataclass
class Trainee:
    """The training state of one contender."""

    contender: Contender
    optimizer: torch.optim.Optimizer
    batches: torch.Generator
    seed: int
    steps: int = 0
    cpu_seconds: float = 0.0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    diverged: bool = False
    last_losses: list[float] = field(default_factory=list)


@dataclass
class TrainSettings:
    """Settings shared by every model.

    Attributes:
        lr: peak learning rate of the one-cycle schedule.
        batch_size: rows per step.
        grad_clip: gradient-norm clip (``0`` for none).
        cpu_seconds: CPU-time budget per model (``budget="cpu"``).
        steps: steps per model (``budget="steps"``).
        budget: ``"cpu"`` or ``"steps"``.
        slice_cpu_seconds: CPU seconds a model trains before the next one takes its turn.
        max_nonfinite: batches in a row with a non-finite loss or gradient after which a model is
            stopped as diverged.
    """

    lr: float
    batch_size: int
    grad_clip: float
    cpu_seconds: float = 60.0
    steps: int = 2000
    budget: str = "cpu"
    slice_cpu_seconds: float = 1.0
    max_nonfinite: int = 20


def _step(t: Trainee, x_train: Tensor, s: TrainSettings, progress: float) -> None:
    """One optimiser step of ``t`` on a batch drawn with its own generator (so every model with the
    same seed sees the same batches). Non-finite losses or gradients skip the batch."""
    model = t.contender.model
    idx = torch.randint(0, x_train.shape[0], (s.batch_size,), generator=t.batches)
    # The step's own random draws (Hutchinson probes, latent draws) depend on (seed, step, retry).
    torch.manual_seed((t.seed * 1_000_003 + t.steps) * 64 + t.nonfinite_in_a_row * 0x9E3779B1)
    for group in t.optimizer.param_groups:
        group["lr"] = one_cycle_lr(progress, s.lr)
    loss = t.contender.loss(x_train[idx])
    ok = bool(torch.isfinite(loss).item())
    if ok:
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    if not ok:
        t.optimizer.zero_grad(set_to_none=True)
        t.nonfinite_total += 1
        t.nonfinite_in_a_row += 1
        t.diverged = t.nonfinite_in_a_row >= s.max_nonfinite
        return
    if s.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
    t.optimizer.step()
    t.nonfinite_in_a_row = 0
    t.steps += 1
    t.last_losses = (t.last_losses + [float(loss.detach())])[-50:]


def train_side_by_side(
    contenders: list[Contender], x_train: Tensor, settings: TrainSettings, seed: int
) -> list[Trainee]:
    """Train every contender to the same budget, interleaved round-robin.

    With ``budget="cpu"`` a model trains for ``slice_cpu_seconds`` of process time per turn
    until it has used ``cpu_seconds`` (its last step may end up to one step past the budget);
    with ``budget="steps"`` it takes about as many steps per turn as fit in the slice, until
    ``steps``. Only training is timed. A model stops early only if it diverges."""
    if settings.budget not in ("cpu", "steps"):
        raise ValueError(f"budget must be 'cpu' or 'steps', got {settings.budget!r}")
    trainees = [
        Trainee(
            c,
            torch.optim.Adam(c.model.parameters(), lr=settings.lr),
            torch.Generator().manual_seed(seed),
            seed,
        )
        for c in contenders
    ]
    for t in trainees:
        t.contender.model.train()

    def done(t: Trainee) -> bool:
        if t.diverged:
            return True
        if settings.budget == "cpu":
            return t.cpu_seconds >= settings.cpu_seconds
        return t.steps >= settings.steps

    while not all(done(t) for t in trainees):
        for t in trainees:
            start = time.process_time()
            used = 0.0
            while not done(t) and used < settings.slice_cpu_seconds:
                if settings.budget == "cpu":
                    progress = (t.cpu_seconds + used) / settings.cpu_seconds
                else:
                    progress = t.steps / settings.steps
                _step(t, x_train, settings, progress)
                used = time.process_time() - start
                if settings.budget == "cpu" and t.cpu_seconds + used >= settings.cpu_seconds:
                    break
            t.cpu_seconds += used
    for t in trainees:
        t.contender.model.eval()
    return trainees


def paired_difference(log_q_ref: Tensor, log_q: Tensor) -> dict[str, float]:
    r"""Mean and standard error over test rows of :math:`\log q_{\mathrm{ref}} - \log q`, on the
    rows where both are finite: how much worse ``log_q`` is than the reference, in NLL (and in
    KL(p‖q), where :math:`\log p` cancels). Paired, so the rows' own spread cancels."""
    ok = torch.isfinite(log_q_ref) & torch.isfinite(log_q)
    mean, se = _mean_stderr((log_q_ref - log_q)[ok])
    return {"diff": mean, "stderr": se, "n": int(ok.sum())}


def _mean_stderr(v: Tensor) -> tuple[float, float]:
    v = v.double()
    n = v.numel()
    if n == 0:
        return float("nan"), float("nan")
    se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(v.mean()), se


def evaluate_density(
    density: Density,
    x: Tensor,
    true_log_prob: LogProb | None,
    chunk: int = 1000,
    mass_data: Tensor | None = None,
    keep_values: bool = False,
) -> dict[str, Any]:
    """Test metrics of one log-density on ``x``: NLL and (with the true density)
    :math:`\\mathrm{KL}(p\\|q) = \\mathbb E_p[\\log p - \\log q]`, each as mean and standard error
    over the rows whose value is finite; the count of rows that are not (a failed solve gives NaN);
    the CPU seconds of the evaluation.

    With ``mass_data`` (points the estimate must cover, e.g. the training split), also the mass
    :math:`M = \\int \\exp \\log q` (:func:`freeflows.eval.mass.density_mass`: quadrature in 1 and
    2 dimensions, NaN points counted as zero) and the NLL and KL of the mass-normalised density
    :math:`q / M` (``+ \\log M``); for a normalised density, :math:`M = 1` checks it.

    With ``keep_values``, the per-row log-densities are returned too, under ``"log_q"`` (a
    tensor, for paired comparisons; not JSON)."""
    start = time.process_time()
    parts = []
    for i in range(0, x.shape[0], chunk):
        parts.append(density.fn(x[i : i + chunk]).detach())
    log_q = torch.cat(parts)
    cpu = time.process_time() - start
    finite = torch.isfinite(log_q)
    out: dict[str, Any] = {
        "normalised": density.normalised,
        "note": density.note,
        "n_rows": int(x.shape[0]),
        "n_failed": int((~finite).sum()),
        "eval_cpu_seconds": cpu,
    }
    if keep_values:
        out["log_q"] = log_q
    out["nll"], out["nll_stderr"] = _mean_stderr(-log_q[finite])
    if true_log_prob is not None:
        log_p = true_log_prob(x).detach()
        out["kl"], out["kl_stderr"] = _mean_stderr((log_p - log_q)[finite])
        out["true_nll"] = float(-log_p.double().mean())
    if mass_data is not None:
        from freeflows.eval.mass import density_mass

        def fn(rows: Tensor) -> Tensor:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # unsolved points are counted
                return density.fn(rows).detach()

        start = time.process_time()
        m = density_mass(fn, mass_data)
        out.update(
            mass=m.mass,
            mass_stderr=m.stderr,
            mass_method=m.method,
            mass_evaluations=m.n,
            mass_unsolved=m.unsolved,
            mass_cpu_seconds=time.process_time() - start,
            nll_mass_normalised=out["nll"] + m.log_mass,
        )
        if "kl" in out:
            out["kl_mass_normalised"] = out["kl"] + m.log_mass
    return out
