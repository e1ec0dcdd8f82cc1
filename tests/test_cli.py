"""The freeflows tool: end-to-end CLI, bad input handling, resume equivalence, 2-process DDP."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from freeflows.cli import main
from freeflows.experiments.config import load_config
from freeflows.runner.train import train, training_steps

TINY = ["--set", "trainer.progress_bar=false"]


def _one_line_error(capsys, code, expected_code=2):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expected_code
    assert len(err) == 1 and err[0].startswith("freeflows: error:"), err
    assert "Traceback" not in err[0]
    return err[0]


def test_unknown_preset_in_a_subprocess_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "freeflows.cli", "train", "no-such-preset"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "unknown preset 'no-such-preset'" in proc.stderr and "two-moons" in proc.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "tiny", "--set", "model.fff.gamma=1"], "unknown config key 'model.fff.gamma'"),
        (["train", "tiny", "--set", "trainer.max_steps=ten"], "trainer.max_steps must be an integer"),
        (["train", "tiny", "--set", "model.kind=spline"], "unknown model.kind 'spline'"),
        (["train", "tiny", "--set", "trainer.max_epochs=0"], "trainer.max_epochs must be an integer >= 1"),
        (["train", "tiny", "--set", "optim.lr"], "--set expects key=value"),
        (["train", "tiny", "--set", "data.name=mnist"], "unknown data set 'mnist'"),
        (["train", "tiny", "--set", "trainer.batch_size=4096"], "exceeds the 2048 training points"),
        (["train", "tiny", "--threads", "0"], "--threads must be >= 1"),
        (["train", "tiny", "--set", "trainer.threads=0"], "trainer.threads must be an integer >= 1"),
        (["train", "tiny", "--set", "trainer.checkpoint_every_steps=0"], "every_steps must be >= 1"),
        (["train", "tiny", "--accelerator", "tpu"], "unknown trainer.accelerator 'tpu'"),
        (["sample", "/nonexistent/run"], "does not exist"),
        (["evaluate", "/nonexistent/run"], "does not exist"),
        (["train", "--resume", "/nonexistent/run"], "not a run directory"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, tmp_path, args, needle):
    if args[0] == "train" and "--resume" not in args:
        args = [*args, "--out", str(tmp_path / "r")]
    line = _one_line_error(capsys, main(args))
    assert needle in line
    assert not (tmp_path / "r").exists(), "a config that fails validation must leave no run directory"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_accelerator_without_a_gpu_is_one_clear_line(capsys, tmp_path):
    args = ["train", "qm9", "--accelerator", "gpu", "--out", str(tmp_path / "r")]
    line = _one_line_error(capsys, main(args))
    assert "trainer.accelerator=gpu" in line and "sees no such device" in line
    assert not (tmp_path / "r").exists()


def test_check_accelerator_accepts_a_visible_gpu(monkeypatch):
    import torch

    from freeflows.runner.train import check_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("gpu", "cuda", "cpu", "auto"):
        check_accelerator(name)  # no error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="cuda"):
        check_accelerator("cuda")


@pytest.mark.parametrize(
    "text,needle", [("", "is empty"), ("# only a comment\n", "is empty"), ("- a\n- b\n", "not a list")]
)
def test_an_empty_or_non_mapping_config_file_is_an_error(capsys, tmp_path, text, needle):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    line = _one_line_error(capsys, main(["train", str(path), "--out", str(tmp_path / "r")]))
    assert needle in line and "config.yaml" in line
    assert not (tmp_path / "r").exists()


def test_float64_data_for_a_float32_model_is_one_clear_line(capsys, tmp_path, monkeypatch):
    import freeflows.runner.train as runner

    real = runner.build_data

    def float64_data(*args, **kwargs):
        data = real(*args, **kwargs)
        for split in (data.train, data.val, data.test):
            split.x = split.x.double()
        return data

    monkeypatch.setattr(runner, "build_data", float64_data)
    line = _one_line_error(capsys, main(["train", "tiny", "--out", str(tmp_path / "r"), *TINY]))
    assert "has float64 values but the model is float32" in line
    assert not (tmp_path / "r").exists()


NO_TOOL = textwrap.dedent(
    """
    import contextlib, io, json, sys
    for name in ("lightning", "matplotlib", "yaml", "tqdm"):
        sys.modules[name] = None  # as if the [tool] extra were not installed
    from freeflows.cli import main
    commands = [["train", "tiny"], ["sample", "run"], ["evaluate", "run"], ["log-prob", "run", "x.npy"],
                ["presets"], ["sbi", "--task", "two_moons", "--budget", "100"], ["bench", "sampling"]]
    results = []
    for argv in commands:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        results.append([argv[0], code, err.getvalue()])
    print(json.dumps(results))
    """
)


def test_without_the_tool_extra_every_command_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_TOOL], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert len(results) == 7
    for command, code, err in results:
        assert code == 2, (command, err)
        assert err.count("\n") == 1 and 'pip install "freeflows[tool]"' in err, (command, err)
    assert not list(tmp_path.iterdir())


def test_the_tty_progress_bar_is_one_bar_over_all_steps(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("freeflows.runner.progress._isatty", lambda stream: True)
    cfg = load_config("tiny", ["trainer.plot=false", "trainer.max_steps=24", "trainer.progress_bar=true"])
    train(cfg, tmp_path / "r")
    err = capsys.readouterr().err
    assert "24/24" in err and "Epoch" not in err
    assert "\n" not in err.rstrip("\n"), "one bar, redrawn in place, for the whole run"


def test_cli_end_to_end_and_corrupt_checkpoint(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(run), *TINY]) == 0
    for name in ("config.yaml", "metrics.json", "metrics.csv", "density.png", "samples.png", "curves.png"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test_nll", "test_reconstruction", "train_seconds", "n_params"):
        assert np.isfinite(metrics[key])
    assert "run directory" in capsys.readouterr().out

    out = tmp_path / "s.npy"
    assert main(["sample", str(run), "-n", "300", "-o", str(out)]) == 0
    assert "wrote 300 samples" in capsys.readouterr().out
    samples = np.load(out)
    assert samples.shape == (300, 2) and np.isfinite(samples).all()

    # the free-form flow's latent term is not the NLL, and the logged name says so
    names = {row.split(",")[1] for row in (run / "metrics.csv").read_text().splitlines()[1:]}
    assert {"loss", "train/latent_nll", "train/reconstruction", "val/nll"} <= names
    assert "train/nll" not in names

    # evaluate recomputes the test metrics and keeps metrics.json's other keys
    (run / "metrics.json").write_text(json.dumps({**metrics, "my_note": "kept", "test_nll": 99.0}))
    assert main(["evaluate", str(run), "--no-plots"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["test_nll"] == pytest.approx(metrics["test_nll"], abs=1e-5)
    kept = json.loads((run / "metrics.json").read_text())
    assert kept["my_note"] == "kept" and kept["n_params"] == metrics["n_params"]
    assert kept["test_nll"] == pytest.approx(metrics["test_nll"], abs=1e-5)

    # a corrupt checkpoint is one clear line, and nothing is overwritten
    for name in ("best.ckpt", "last.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"not a checkpoint")
    line = _one_line_error(capsys, main(["evaluate", str(run)]))
    assert "corrupt" in line
    line = _one_line_error(capsys, main(["train", "--resume", str(run)]))
    assert "corrupt" in line


def _state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    """Train 32 steps straight, or 16 steps then resume to 32: the final weights agree."""
    base = [
        "trainer.progress_bar=false",
        "trainer.plot=false",
        "optim.schedule_steps=32",
        "trainer.val_every_epochs=1",
    ]
    full = train(load_config("tiny", [*base, "trainer.max_steps=32"]), tmp_path / "full")
    half_cfg = load_config("tiny", [*base, "trainer.max_steps=16"])
    half = train(half_cfg, tmp_path / "half")
    assert torch.load(half / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 16
    midway = _state(half)
    resumed_cfg = load_config(str(half / "config.yaml"), ["trainer.max_steps=32"])
    train(resumed_cfg, half, resume=True)
    a, b = _state(full), _state(half)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    # the weights really changed during the second half, so the comparison is not vacuous
    assert max((b[k] - midway[k]).abs().max() for k in b) > 1e-3
    rows = (half / "metrics.csv").read_text().splitlines()
    steps = [int(r.split(",")[0]) for r in rows[1:] if r.split(",")[1] == "loss"]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), "resume must not duplicate curve rows"


def test_training_steps_from_epochs():
    tr = {"max_steps": 10_000, "max_epochs": None, "batch_size": 128, "devices": 1, "num_nodes": 1}
    assert training_steps(tr, 9_500) == 10_000  # no epochs: max_steps
    assert training_steps({**tr, "max_epochs": 3}, 9_500) == 3 * 74  # 9500 // 128 = 74 full batches
    assert training_steps({**tr, "max_epochs": 3, "devices": 2}, 9_500) == 3 * 37  # 4750 per rank
    assert training_steps({**tr, "max_epochs": 1000}, 9_500) == 10_000  # max_steps caps it
    assert training_steps({**tr, "max_epochs": 2}, 100) == 2  # fewer points than a batch: one step


def test_max_epochs_sets_the_run_length_and_the_schedule(tmp_path):
    """tiny has 2048 training points at batch 256: 8 steps per epoch, so 3 epochs stop at step 24,
    and the cosine schedule reaches zero exactly there."""
    cfg = load_config(
        "tiny",
        ["trainer.progress_bar=false", "trainer.plot=false", "trainer.max_epochs=3", "optim.warmup_steps=0"],
    )
    run = train(cfg, tmp_path / "r")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 24
    assert ckpt["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)


def test_skipped_batches_do_not_reuse_random_draws(tmp_path):
    """A skipped batch leaves the step count where it was; the retries must still draw afresh."""
    import lightning as L

    from freeflows.contract import NumericalError
    from freeflows.runner.callbacks import DivergenceError

    draws: list[float] = []

    class FailingLoss(L.Callback):
        def on_train_start(self, trainer, module):
            def loss(x, c=None):
                draws.append(torch.rand(()).item())
                raise NumericalError("solve failed")

            module.model.loss = loss

    cfg = load_config("tiny", ["trainer.progress_bar=false", "trainer.plot=false", "trainer.max_nonfinite=3"])
    with pytest.raises(DivergenceError, match="3 batches in a row"):
        train(cfg, tmp_path / "r", callbacks=[FailingLoss()])
    assert len(draws) == 3 and len(set(draws)) == 3, draws


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import lightning as L
    from freeflows.experiments.config import load_config
    from freeflows.runner.train import train

    class Dump(L.Callback):
        def on_train_end(self, trainer, module):
            torch.save(module.model.state_dict(), f"{sys.argv[1]}/rank{trainer.global_rank}.pt")

    if __name__ == "__main__":
        torch.set_num_threads(1)
        cfg = load_config("tiny", ["trainer.max_steps=6", "trainer.devices=2", "trainer.strategy=ddp",
                                   "trainer.progress_bar=false", "trainer.plot=false"])
        train(cfg, sys.argv[1], callbacks=[Dump()])
    """
)


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(script), str(run)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(run / "rank0.pt"), torch.load(run / "rank1.pt")
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    # the zero-initialised output layers moved, so training really happened on both ranks
    assert r0["encoder.blocks.0.branch.4.weight"].abs().max() > 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6
