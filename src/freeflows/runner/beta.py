r"""Adapting a free-form flow's reconstruction weight β during training.

β trades the likelihood against how well the decoder inverts the encoder, and the surrogate
gradient's error grows with the inverse defect :math:`\lVert J_g J_f - I\rVert_F`
(``docs/estimator-error.md``). Instead of fixing β, :class:`AdaptiveBeta` holds a validation
metric :math:`m` (by default ``val/inverse_defect_per_dim``, the batch mean of
:math:`\lVert J_g J_f - I\rVert_F^2` divided by the latent's dimension) at a target
:math:`\tau`, by a multiplicative dual-ascent step on :math:`\log\beta` after every validation:

.. math:: \log\beta \leftarrow \operatorname{clip}\bigl(\log\beta + \operatorname{clip}(
   \eta\,(\log m - \log\tau),\ \pm\log\rho),\ \log\beta_{\min},\ \log\beta_{\max}\bigr) .

One update changes β by at most a factor :math:`\rho` (``max_factor``): early in training the
defect is near zero (the networks start as the identity), and an unlimited step would drop β
by orders of magnitude before the networks have moved.

This is the Lagrange-multiplier update of the constrained problem "minimise the NLL subject to
:math:`m \le \tau`", with β the multiplier, taken in log space so that it stays positive and the
step does not depend on the metric's scale: β grows while the metric is above the target and
shrinks while it is below. With ``metric="val/reconstruction"`` the constraint is exactly the
one that β multiplies in the loss.

The model only needs a float attribute ``beta`` that its loss reads. β is logged as ``beta`` at
every training step and saved with the callback's state in the checkpoint, so a resumed run
continues from the β it had.

In a config, ``model.<kind>.beta: auto`` turns it on for any model kind with a ``beta`` option;
the section ``beta_auto`` holds ``start`` (the first β), ``target``, ``metric``, ``rate``,
``min``, ``max`` and ``max_factor`` (:func:`model_section` and :func:`callback_from_config`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class AdaptiveBeta(Callback):
    r"""Keep a validation metric at ``target`` by adapting the model's ``beta`` (see the module
    docstring).

    Args:
        target: :math:`\tau > 0`, the value of ``metric`` to hold.
        metric: a logged validation metric: ``"val/inverse_defect_per_dim"``,
            ``"val/inverse_defect"`` or ``"val/reconstruction"``.
        rate: :math:`\eta > 0`, the step on :math:`\log\beta` per unit of
            :math:`\log(m/\tau)`.
        beta_min: lower limit of β, ``> 0``.
        beta_max: upper limit of β.
        max_factor: :math:`\rho > 1`, the most that one update multiplies or divides β by.

    Example:
        >>> from freeflows.runner.beta import AdaptiveBeta
        >>> cb = AdaptiveBeta(target=1e-3, rate=0.5)
        >>> round(cb.step(beta=10.0, value=2e-3), 3)  # above the target: beta * 2 ** 0.5
        14.142
        >>> round(cb.step(beta=10.0, value=1e-9), 3)  # far below: at most halved
        5.0
    """

    def __init__(
        self,
        target: float,
        metric: str = "val/inverse_defect_per_dim",
        rate: float = 0.5,
        beta_min: float = 0.1,
        beta_max: float = 1e4,
        max_factor: float = 2.0,
    ) -> None:
        limits = {"target": target, "rate": rate, "beta_min": beta_min, "beta_max": beta_max}
        limits["max_factor"] = max_factor
        for name, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"adaptive beta: {name} must be a finite number > 0, got {value!r}")
        if max_factor <= 1:
            raise ValueError(f"adaptive beta: max_factor must be > 1, got {max_factor!r}")
        if beta_min > beta_max:
            raise ValueError(f"adaptive beta: beta_min {beta_min:g} exceeds beta_max {beta_max:g}")
        self.target = float(target)
        self.metric = metric
        self.rate = float(rate)
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.max_factor = float(max_factor)
        #: ``(step, beta)`` after every update, in order.
        self.history: list[tuple[int, float]] = []
        self._restored: float | None = None

    def step(self, beta: float, value: float) -> float:
        """The next β after a validation where ``metric`` had ``value``.

        Args:
            beta: the current β.
            value: the metric's value; a non-finite or non-positive value leaves β unchanged.

        Returns:
            The new β, within ``[beta_min, beta_max]``.
        """
        if not (math.isfinite(value) and value > 0):
            return beta
        cap = math.log(self.max_factor)
        step = min(cap, max(-cap, self.rate * (math.log(value) - math.log(self.target))))
        log_beta = math.log(beta) + step
        return min(self.beta_max, max(self.beta_min, math.exp(log_beta)))

    @staticmethod
    def _model(pl_module: L.LightningModule) -> Any:
        model = getattr(pl_module, "model", pl_module)
        beta = getattr(model, "beta", None)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(
                f"adaptive beta needs a model with a float attribute beta > 0; {type(model).__name__} "
                f"has beta={beta!r}"
            )
        return model

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Set the model's β to the checkpoint's on resume, then clip it to ``[beta_min, beta_max]``."""
        model = self._model(pl_module)
        if self._restored is not None:  # resumed: continue from the checkpoint's beta
            model.beta = self._restored
        model.beta = min(self.beta_max, max(self.beta_min, float(model.beta)))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Log the model's current β as ``beta`` at every training step."""
        pl_module.log("beta", float(self._model(pl_module).beta), on_step=True, on_epoch=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Update β from the validation's ``metric`` (not during the sanity check) and record it in
        :attr:`history`; a ``ValueError`` if the model does not log ``metric``."""
        if trainer.sanity_checking:
            return
        if self.metric not in trainer.callback_metrics:
            logged = ", ".join(sorted(k for k in trainer.callback_metrics if k.startswith("val/")))
            raise ValueError(
                f"adaptive beta follows {self.metric!r}, which this model does not log (it logs: {logged})"
            )
        model = self._model(pl_module)
        value = float(trainer.callback_metrics[self.metric])
        model.beta = self.step(float(model.beta), value)
        self.history.append((int(trainer.global_step), model.beta))

    def state_dict(self) -> dict[str, Any]:
        """The latest β and the update history, saved in the checkpoint."""
        beta = self.history[-1][1] if self.history else self._restored
        return {"beta": beta, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history and the β that :meth:`on_train_start` gives the model on resume."""
        self.history = [(int(s), float(b)) for s, b in state_dict.get("history", [])]
        beta = state_dict.get("beta")
        self._restored = None if beta is None else float(beta)


AUTO = "auto"


def adapts_beta(cfg: dict[str, Any]) -> bool:
    """Whether ``cfg`` asks for ``model.<kind>.beta: auto``."""
    kind = cfg["model"]["kind"]
    return (cfg["model"].get(kind) or {}).get("beta") == AUTO


def model_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config's ``model`` section to build from: with ``beta: auto``, the model starts at
    ``beta_auto.start``.

    Args:
        cfg: a validated config.

    Returns:
        The ``model`` section (a copy when changed).
    """
    if not adapts_beta(cfg):
        return cfg["model"]
    kind = cfg["model"]["kind"]
    return {**cfg["model"], kind: {**cfg["model"][kind], "beta": float(cfg["beta_auto"]["start"])}}


def callback_from_config(cfg: dict[str, Any]) -> AdaptiveBeta | None:
    """The :class:`AdaptiveBeta` callback that ``beta: auto`` asks for, or ``None``.

    Args:
        cfg: a validated config.

    Returns:
        The callback, or ``None`` when β is a number.

    Raises:
        ValueError: for a bad ``beta_auto`` value, in one line.
    """
    if not adapts_beta(cfg):
        return None
    o = cfg["beta_auto"]
    return AdaptiveBeta(
        o["target"], metric=o["metric"], rate=o["rate"], beta_min=o["min"], beta_max=o["max"],
        max_factor=o["max_factor"],
    )
