"""One progress display for a whole training run, counted in optimiser steps.

On a terminal it is a single tqdm bar (step/total, steps per second, elapsed time and ETA, and
the latest ``loss`` and ``val/nll``). When the stream is not a terminal (a log file, CI, a pipe),
it writes a plain line every ``log_fraction`` of the run or every ``log_seconds``, whichever comes
first, and never a carriage return.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from lightning.pytorch.callbacks import ProgressBar

#: the logged values shown next to the step count (those the run has logged so far)
SHOWN_METRICS = ("loss", "val/nll")


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_seconds(seconds: float) -> str:
    """``3725.2`` -> ``"1:02:05"``; ``65`` -> ``"1:05"``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepProgressBar(ProgressBar):
    """Progress over the run's ``max_steps`` optimiser steps (a resumed run starts at its step).

    Arguments:
        stream: where to write (default ``sys.stderr`` at the start of training).
        log_fraction: without a terminal, write a line each time this fraction of the run is done.
        log_seconds: without a terminal, also write a line when this long has passed since the last.
        tty: force the terminal (``True``) or log-line (``False``) display; default: ``stream.isatty()``.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        log_fraction: float = 0.1,
        log_seconds: float = 60.0,
        tty: bool | None = None,
    ):
        super().__init__()
        self._stream_arg, self._tty_arg = stream, tty
        self.log_fraction, self.log_seconds = log_fraction, log_seconds
        self._enabled = True
        self._bar: Any = None
        self._stream: TextIO = sys.stderr
        self._total = self._start = self._last_step = self._logged_step = 0
        self._t0 = self._last_line_time = 0.0
        self._next_mark = 0

    # -- the ProgressBar interface --------------------------------------------------------------
    def disable(self) -> None:
        """Turn the display off (Lightning calls it on non-zero ranks)."""
        self._enabled = False

    def enable(self) -> None:
        """Turn the display back on."""
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Print a message without breaking the bar (through tqdm when the bar is shown)."""
        if self._bar is not None:
            self._bar.write(" ".join(map(str, args)), file=self._stream)
        else:
            print(*args, file=self._stream, **kwargs)

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """On rank 0, open the tqdm bar (on a terminal) or set up the log lines, starting at the run's
        current step."""
        if not (self._enabled and trainer.is_global_zero):
            return
        self._stream = self._stream_arg or sys.stderr
        tty = self._tty_arg if self._tty_arg is not None else _isatty(self._stream)
        self._total = int(trainer.max_steps)
        self._start = self._last_step = self._logged_step = int(trainer.global_step)
        self._t0 = self._last_line_time = time.monotonic()
        step_mark = max(1, int(self._total * self.log_fraction))
        self._next_mark = (self._start // step_mark + 1) * step_mark
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._total,
                initial=self._start,
                desc="train",
                unit="step",
                file=self._stream,
                dynamic_ncols=True,
                leave=True,
            )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Advance the bar with the latest metrics, or, without a terminal, write a line when the next
        ``log_fraction`` mark or ``log_seconds`` is reached."""
        if not (self._enabled and trainer.is_global_zero) or self._total == 0:
            return
        step = int(trainer.global_step)
        if self._bar is not None:
            if step != self._last_step:
                self._bar.update(step - self._last_step)
                self._bar.set_postfix_str(self._metrics(trainer), refresh=False)
            self._last_step = step
            return
        self._last_step = step
        now = time.monotonic()
        if step >= self._next_mark or now - self._last_line_time >= self.log_seconds:
            self._write_line(trainer, step, now)
            step_mark = max(1, int(self._total * self.log_fraction))
            self._next_mark = (step // step_mark + 1) * step_mark

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Close the bar, or write a line for the step where the run ended if none was written for it."""
        self._close(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Close the bar, or write a line for the step where the run stopped if none was written for it."""
        self._close(trainer)

    # -- helpers --------------------------------------------------------------------------------
    def _metrics(self, trainer: Any) -> str:
        shown = trainer.progress_bar_metrics
        return "  ".join(f"{key} {float(shown[key]):.4g}" for key in SHOWN_METRICS if key in shown)

    def _write_line(self, trainer: Any, step: int, now: float) -> None:
        elapsed = now - self._t0
        done = step - self._start
        eta = (self._total - step) * elapsed / done if done > 0 else float("nan")
        parts = [f"step {step}/{self._total} ({100 * step / self._total:.0f}%)"]
        if metrics := self._metrics(trainer):
            parts.append(metrics)
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if eta == eta and step < self._total:
            parts.append(f"eta {format_seconds(eta)}")
        print("  ".join(parts), file=self._stream, flush=True)
        self._last_line_time, self._logged_step = now, step

    def _close(self, trainer: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._total and self._last_step not in (self._start, self._logged_step):
            self._write_line(trainer, self._last_step, time.monotonic())  # where the run stopped
        self._total = 0
