"""Runs survive interruption: periodic atomic checkpoints, SIGINT/SIGTERM stop cleanly with a
checkpoint, and a resume from any step (mid-epoch too) ends at the same weights as a run that was
never stopped. The tiny preset has 2048 training points at batch 256: 8 steps per epoch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from freeflows.experiments.config import load_config
from freeflows.runner.callbacks import TrainingInterrupted
from freeflows.runner.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["trainer.progress_bar=false", "trainer.plot=false"]


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)


def _max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = _ckpt(a)["state_dict"], _ckpt(b)["state_dict"]
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_resume_from_the_middle_of_an_epoch_is_exact(tmp_path):
    """Stop at step 13 (5 batches into the second epoch), resume to 40: the weights equal those of
    a run that went straight to 40. Without skipping the epoch's used batches they differ by ~3e-3."""
    base = [*QUIET, "optim.schedule_steps=40", "trainer.val_every_epochs=1"]
    full = train(load_config("tiny", [*base, "trainer.max_steps=40"]), tmp_path / "full")
    half = train(load_config("tiny", [*base, "trainer.max_steps=13"]), tmp_path / "half")
    assert _ckpt(half)["global_step"] == 13
    midway = _ckpt(half)["state_dict"]
    train(load_config(str(half / "config.yaml"), ["trainer.max_steps=40"]), half, resume=True)
    assert _ckpt(half)["global_step"] == 40
    assert _max_weight_difference(full, half) == 0.0
    assert max(float((_ckpt(half)["state_dict"][k] - v).abs().max()) for k, v in midway.items()) > 1e-3


class _Spy(L.Callback):
    """Records the step stored in last.ckpt after every batch, and can send a signal at a step."""

    def __init__(self, path: Path, signal_at: int | None = None, signum: int = signal.SIGTERM):
        self.path, self.signal_at, self.signum = path, signal_at, signum
        self.seen: list[tuple[int, int | None]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        stored = torch.load(self.path, weights_only=False)["global_step"] if self.path.is_file() else None
        self.seen.append((trainer.global_step, stored))
        if trainer.global_step == self.signal_at:
            os.kill(os.getpid(), self.signum)


def test_last_checkpoint_every_n_steps_not_only_at_epoch_ends(tmp_path):
    run = tmp_path / "r"
    spy = _Spy(run / "checkpoints" / "last.ckpt")
    cfg = load_config("tiny", [*QUIET, "trainer.max_steps=13", "trainer.checkpoint_every_steps=3"])
    train(cfg, run, callbacks=[spy])
    assert [stored for _, stored in spy.seen] == [None, None, 3, 3, 3, 6, 6, 6, 9, 9, 9, 12, 13]
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_sigterm_stops_after_the_batch_with_a_checkpoint_and_restores_the_handlers(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    run = tmp_path / "r"
    spy = _Spy(run / "checkpoints" / "last.ckpt", signal_at=10)
    cfg = load_config("tiny", [*QUIET, "trainer.max_steps=40"])
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, run, callbacks=[spy])
    # the spy runs after the checkpoint callback, so the stop comes after the next batch
    assert info.value.signum == signal.SIGTERM and info.value.exit_status == 143
    assert info.value.step == 11 and info.value.run_dir == run
    assert _ckpt(run)["global_step"] == 11
    assert {s: signal.getsignal(s) for s in before} == before
    assert not (run / "metrics.json").exists()  # no evaluation of a half-trained model


def test_progress_without_a_terminal_is_a_few_plain_lines(tmp_path, capsys):
    cfg = load_config("tiny", ["trainer.plot=false", "trainer.max_steps=40", "trainer.progress_bar=true"])
    train(cfg, tmp_path / "r")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    # one line per 10 % of the run (steps 4, 8, ..., 40), with the loss and the time left
    assert [line.split()[1] for line in lines] == [f"{s}/40" for s in range(4, 41, 4)]
    assert "loss" in lines[0] and "eta" in lines[0] and "elapsed" in lines[-1]


def _freeflows(*args: str) -> list[str]:
    return [sys.executable, "-m", "freeflows.cli", *args]


@pytest.mark.slow  # two `freeflows` processes and a third run: about 30 s on a loaded 2-core machine
def test_sigint_mid_run_exits_130_and_the_resumed_run_ends_at_the_uninterrupted_weights(tmp_path):
    """A real `freeflows train` process gets SIGINT as soon as its first checkpoint exists. It
    writes last.ckpt, prints one line with the run directory and the resume command, and exits 130.
    `freeflows train --resume` then ends at exactly the weights of a run that was never stopped."""
    sets = ["trainer.max_steps=150", "trainer.checkpoint_every_steps=5", "trainer.plot=false"]
    overrides = [arg for key in sets for arg in ("--set", key)]
    run = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _freeflows("train", "tiny", *overrides, "--threads", "1", "--out", str(run)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.ckpt").is_file():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert sum("--resume" in line for line in lines) == 1
    assert lines[-1].startswith("freeflows: interrupted") and str(run) in lines[-1]
    assert f"freeflows train --resume {run}" in lines[-1]
    stopped = int(_ckpt(run)["global_step"])
    assert 5 <= stopped < 150 and f"step {stopped}" in lines[-1]
    assert not (run / "metrics.json").exists()

    resumed = subprocess.run(
        _freeflows("train", "--resume", str(run)), capture_output=True, text=True, env=env, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _ckpt(run)["global_step"] == 150

    full = tmp_path / "full"
    train(load_config("tiny", [*sets, "trainer.threads=1", "trainer.progress_bar=false"]), full)
    assert _max_weight_difference(full, run) == 0.0
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    steps = [int(r.split(",")[0]) for r in rows if ",loss," in r]
    assert steps == sorted(set(steps)), "the resumed run must not duplicate rows of the curves"


def test_metrics_csv_restarts_on_a_fresh_training_and_is_cut_at_the_resume_step(tmp_path):
    from freeflows.runner.callbacks import CSVMetricsLogger

    path = tmp_path / "metrics.csv"
    first = CSVMetricsLogger(path)
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": float(step)}, step)
    resumed = CSVMetricsLogger(path, resume_step=2)  # the interrupted run's row after step 2 goes
    resumed.log_metrics({"train/loss": 30.0}, 3)
    rows = path.read_text().splitlines()
    assert rows == ["step,metric,value", "1,train/loss,1.0", "2,train/loss,2.0", "3,train/loss,30.0"]
    CSVMetricsLogger(path).log_metrics({"train/loss": 7.0}, 1)  # trained again from scratch
    assert path.read_text().splitlines() == ["step,metric,value", "1,train/loss,7.0"]
