"""Runner plumbing: atomic checkpoint files, a CSV metrics logger, and the divergence error."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO


class DivergenceError(RuntimeError):
    """Training stopped because the loss kept being non-finite."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to ``<path>.tmp`` and renames it into place, so a crash mid-write
    never leaves a truncated checkpoint where a good one was."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
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
    checkpoint) are dropped, so the curves have no duplicates.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        super().__init__()
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            self._truncate(resume_step)

    @rank_zero_only
    def _truncate(self, step: int) -> None:
        with open(self.path, newline="") as fh:
            rows = [r for r in csv.reader(fh)]
        keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
        with open(self.path, "w", newline="") as fh:
            csv.writer(fh).writerows(keep)

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["step", "metric", "value"])
            for key, value in metrics.items():
                if key == "epoch":
                    continue
                writer.writerow([step, key, float(value)])
