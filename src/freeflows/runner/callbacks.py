"""Runner plumbing: atomic checkpoint files, the run's ``last.ckpt`` and its stop on SIGINT/SIGTERM,
a CSV metrics logger, and the divergence error."""

from __future__ import annotations

import csv
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO


class DivergenceError(RuntimeError):
    """Training stopped because the loss kept being non-finite."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM.

    Arguments:
        signum: the signal; a command exits with status ``128 + signum`` (130 for Ctrl-C).
        step: the optimiser step of the checkpoint written on the way out (``None`` if the signal
            came before training started or after it ended, so no checkpoint was written for it).
    """

    def __init__(self, signum: int, step: int | None = None):
        self.signum, self.step = int(signum), step
        self.run_dir: Path | None = None  # set by the runner, which knows it
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        where = f" at step {step}" if step is not None else ""
        super().__init__(f"training interrupted by {name}{where}")

    @property
    def exit_status(self) -> int:
        """The command's exit status, ``128 + signum``."""
        return 128 + self.signum


class RunCheckpoint(Callback):
    """Keeps ``last.ckpt`` current, and turns SIGINT/SIGTERM into a clean stop.

    ``last.ckpt`` is written (atomically, through the trainer's checkpoint IO) after every
    ``every_steps``-th optimiser step, after the run's last step, at the end of training if the
    run stopped early, and when a signal asks the run to stop. Every checkpoint is taken after a
    whole training batch, so a resumed run continues exactly where it was (the data loader skips
    the batches of the current epoch that were already used, see
    :class:`~freeflows.runner.data.EpochShuffle`).

    Signals. :meth:`install` (before ``trainer.fit``) makes SIGINT and SIGTERM raise
    :class:`TrainingInterrupted` at once, since no training step is under way. From the start of
    training to its end they only set a flag: after the current batch every process (the decision
    is reduced across DDP ranks) writes ``last.ckpt`` and raises :class:`TrainingInterrupted`. A
    second signal while the first is handled stops at once. :meth:`uninstall` restores the
    handlers that were there before. Handlers can be set only from the main thread; elsewhere the
    callback only writes the periodic checkpoints.

    Arguments:
        path: the checkpoint file (``<run>/checkpoints/last.ckpt``).
        every_steps: steps between two periodic checkpoints (``trainer.checkpoint_every_steps``).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, path: Path, every_steps: int):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.path, self.every_steps = Path(path), int(every_steps)
        self.signum: int | None = None
        self._saved_step: int | None = None
        self._originals: dict[int, Any] = {}

    # -- signal handlers ------------------------------------------------------------------------
    def install(self) -> None:
        """Remember the current SIGINT/SIGTERM handlers and make both stop the run at once."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._originals = {s: signal.getsignal(s) for s in self.SIGNALS}
        self._set(self._stop_now)

    def uninstall(self) -> None:
        """Restore the handlers :meth:`install` found."""
        for signum, handler in self._originals.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._originals = {}

    def _set(self, handler: Any) -> None:
        if self._originals and threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                signal.signal(signum, handler)

    def _stop_now(self, signum: int, frame: Any) -> None:
        raise TrainingInterrupted(signum)

    def _stop_after_batch(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._set(self._stop_now)  # a second signal does not wait

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Once :meth:`install` has run, make SIGINT/SIGTERM stop the run after the current batch."""
        # Lightning sets its own SIGTERM handler when fit starts; ours replaces it while training.
        self._set(self._stop_after_batch)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Write ``last.ckpt`` when a periodic or the last step is due or a signal came, then raise
        :class:`TrainingInterrupted` for a signal (the stop is agreed across DDP ranks)."""
        stop = self.signum is not None
        if trainer.world_size > 1:  # every rank stops after the same batch
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        step = int(trainer.global_step)
        due = step != self._saved_step and (step % self.every_steps == 0 or step >= trainer.max_steps)
        if stop or due:
            self.save(trainer)
        if stop:
            raise TrainingInterrupted(self.signum if self.signum is not None else signal.SIGINT, step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Write ``last.ckpt`` if the last step is not saved yet; signals stop the run at once again."""
        if int(trainer.global_step) != self._saved_step:  # e.g. early stopping at an epoch's end
            self.save(trainer)
        self._set(self._stop_now)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Make signals stop at once again when training fails."""
        self._set(self._stop_now)

    def save(self, trainer: Any) -> None:
        """Write ``last.ckpt`` now (call it on every rank: only rank 0 writes)."""
        trainer.save_checkpoint(self.path)
        self._saved_step = int(trainer.global_step)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to ``<path>.tmp`` and renames it into place, so a crash mid-write
    never leaves a truncated checkpoint where a good one was."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Write the checkpoint to ``<path>.tmp``, fsync it and rename it to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Read a checkpoint onto the CPU with :func:`read_checkpoint`."""
        return read_checkpoint(Path(path))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file, turning every failure into a :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no model state; it is not a freeflows checkpoint")
    return ckpt


class CSVMetricsLogger(Logger):
    """Appends every logged value to ``metrics.csv`` as rows ``step,metric,value``.

    On resume from step ``s``, rows after ``s`` (written by the interrupted run after its last
    checkpoint) are dropped, so the curves have no duplicates. A fresh training (no resume)
    starts the file anew, so a run directory trained again holds only the new run's rows.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        super().__init__()
        self.path = Path(path)
        if self.path.is_file():
            self._truncate(-1 if resume_step is None else resume_step)

    @rank_zero_only
    def _truncate(self, step: int) -> None:
        with open(self.path, newline="") as fh:
            rows = [r for r in csv.reader(fh)]
        keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
        with open(self.path, "w", newline="") as fh:
            csv.writer(fh).writerows(keep)

    @property
    def name(self) -> str:
        """The logger's name, ``"csv"``."""
        return "csv"

    @property
    def version(self) -> int:
        """The logger's version, always ``0``."""
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Do nothing: the hyperparameters are in the run's ``config.yaml``."""
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Append a ``step,metric,value`` row per metric but ``epoch`` (a new file gets a header)."""
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["step", "metric", "value"])
            for key, value in metrics.items():
                if key == "epoch":
                    continue
                writer.writerow([step, key, float(value)])
