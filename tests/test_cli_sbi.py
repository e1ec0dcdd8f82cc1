"""``freeflows sbi``: train on an sbibm task, draw posteriors, score them by C2ST (needs the [sbi] extra)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freeflows.cli import main
from freeflows.data.sbi import TASKS
from freeflows.experiments.config import list_presets, load_config
from freeflows.runner.train import training_steps
from sbi_cases import tiny_fff_sbi_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_offline_task_has_a_conditional_fff_preset():
    presets = list_presets()
    for task in TASKS:
        assert presets.get(f"sbi-{task}"), f"preset sbi-{task} is missing or has no description"
        cfg = load_config(f"sbi-{task}")
        assert cfg["data"]["name"] == f"sbi:{task}" and cfg["model"]["kind"] == "fff"
        assert cfg["trainer"]["threads"] == 1
        # training is given in epochs, so a larger budget trains for more steps
        per_budget = [training_steps(cfg["trainer"], int(0.85 * n)) for n in (1000, 10_000)]
        assert per_budget[1] >= 3 * per_budget[0], (task, per_budget)


def test_sbi_cli_end_to_end_fff(tmp_path, capsys):
    pytest.importorskip("sbibm")
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    code, result = tiny_fff_sbi_run("two_moons", out)
    assert code == 0
    assert result["task"] == "two_moons" and result["budget"] == 300 and result["method"] == "fff"
    assert result["c2st_classifier"] == "sklearn" and result["sbibm_comparable"]
    assert [row["observation"] for row in result["observations"]] == [1]
    assert 0.45 <= result["mean_c2st"] <= 1.0
    assert (out / "sbi_c2st.md").is_file() and (out / "pairplot_obs1.png").is_file()
    assert (out / "checkpoints" / "best.ckpt").is_file() or (out / "checkpoints" / "last.ckpt").is_file()
    draws = np.load(out / "posterior_obs1.npy")
    # two_moons' prior is uniform on [-1, 1]^2: draws outside it are rejected.
    assert draws.shape == (300, 2) and np.abs(draws).max() <= 1.0
    assert "mean C2ST" in capsys.readouterr().out


def test_sbi_cli_unbounded_fff_draws_inside_the_box(tmp_path):
    # With data.options.unbounded the model learns logit-mapped theta: even barely trained, every
    # draw maps back inside slcp's prior box [-3, 3]^5 (the plain preset is tested above).
    pytest.importorskip("sbibm")
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    code, result = tiny_fff_sbi_run("slcp", out, "data.options.unbounded=true")
    assert code == 0
    assert result["observations"][0]["prior_acceptance"] >= 0.999
    draws = np.load(out / "posterior_obs1.npy")
    assert draws.shape == (300, 5) and np.abs(draws).max() <= 3.0


def test_sbi_cli_reuse_rescores_a_trained_model_with_new_sampling_options(tmp_path, capsys):
    # A second run with --reuse and only a sampling option changed loads the trained model (the
    # same checkpoint, steps and recorded training time) and samples it with refinement; any
    # training option changed is a one-line error that leaves the run directory as it was.
    pytest.importorskip("sbibm")
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    code, first = tiny_fff_sbi_run("two_moons", out)
    assert code == 0 and first["reused_training"] is False
    ckpt = (out / "checkpoints" / "best.ckpt").read_bytes()
    plain = np.load(out / "posterior_obs1.npy")
    code, again = tiny_fff_sbi_run("two_moons", out, "model.fff.sample_refine_steps=5", "--reuse")
    assert code == 0 and again["reused_training"] is True
    assert again["train_seconds"] == first["train_seconds"] and again["steps"] == first["steps"]
    assert again["model"]["fff"]["sample_refine_steps"] == 5
    assert (out / "checkpoints" / "best.ckpt").read_bytes() == ckpt
    # same seeds, same model: the draws differ only because they were refined
    refined = np.load(out / "posterior_obs1.npy")
    assert refined.shape == plain.shape and not np.array_equal(refined, plain)
    capsys.readouterr()
    code, _ = tiny_fff_sbi_run("two_moons", out, "optim.lr=0.01", "--reuse")
    err = capsys.readouterr().err
    assert code == 2 and "optim.lr" in err and len(err.strip().splitlines()) == 1
    assert (out / "checkpoints" / "best.ckpt").read_bytes() == ckpt


def _tiny_npe_run(run_sbi, out, observations, num_samples, **options):
    """A seconds-long NPE-NSF run on 200 two_moons simulations (2 epochs, 16 hidden units)."""
    return run_sbi(
        "two_moons",
        200,
        method="npe-nsf",
        observations=observations,
        num_samples=num_samples,
        out=out,
        plots="none",
        npe_options={"max_num_epochs": 2, "hidden_features": 16},
        log=lambda message: None,
        **options,
    )


def test_sbi_npe_baseline_writes_the_same_outputs(tmp_path, monkeypatch):
    pytest.importorskip("sbibm")
    pytest.importorskip("sbi")
    from freeflows.experiments.sbi import run_sbi

    monkeypatch.chdir(tmp_path)
    result = _tiny_npe_run(run_sbi, tmp_path / "npe", [2], 200)
    # sbi's tensorboard summary lands in the run directory, not in the working directory
    assert not (tmp_path / "sbi-logs").exists()
    assert any((tmp_path / "npe" / "npe-tensorboard").glob("events.out.tfevents.*"))
    assert result["method"] == "npe-nsf" and result["sbibm_comparable"]
    assert 0.45 <= result["mean_c2st"] <= 1.0
    assert (tmp_path / "npe" / "sbi_c2st.json").is_file() and (
        tmp_path / "npe" / "posterior_obs2.npy"
    ).is_file()
    assert not (tmp_path / "npe" / "pairplot_obs2.png").exists()


def test_batched_c2st_scores_every_observation_at_once(tmp_path):
    """``c2st_classifier="batched"`` scores all observations in one c2st_many call; each score is
    the one c2st(..., classifier="batched") gives on that observation's saved draws."""
    pytest.importorskip("sbibm")
    pytest.importorskip("sbi")
    from freeflows.data.sbi import reference_posterior
    from freeflows.eval.c2st import c2st
    from freeflows.experiments.sbi import run_sbi

    result = _tiny_npe_run(run_sbi, tmp_path / "npe", [1, 3], 300, c2st_classifier="batched")
    assert result["c2st_classifier"] == "batched" and result["sbibm_comparable"]
    for row in result["observations"]:
        draws = torch.from_numpy(np.load(tmp_path / "npe" / f"posterior_obs{row['observation']}.npy"))
        reference = reference_posterior("two_moons", row["observation"])[:300]
        alone = c2st(reference, draws, seed=1, classifier="batched")
        assert row["c2st"] == pytest.approx(alone, abs=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "lotka-volterra", "--budget", "100"], "unknown sbi task"),
        (["--task", "two_moons", "--budget", "100", "--method", "snle"], "unknown method"),
        (["--task", "two_moons", "--budget", "100", "--observations", "0..2"], "1..10"),
        (["--task", "two_moons", "--budget", "100", "--observations", "one"], "--observations"),
        (["--task", "two_moons", "--budget", "100", "--num-samples", "20000"], "--num-samples"),
        (["--task", "two_moons", "--budget", "5"], "--budget"),
        (["--task", "two_moons", "--budget", "100", "--set", "data.n_train=5"], "--set"),
        (["--task", "two_moons", "--budget", "100", "--set", "model.fff.nope=1"], "nope"),
        (["--task", "two_moons", "--budget", "100", "--c2st", "fast"], "unknown C2ST classifier"),
        (["--task", "two_moons", "--budget", "100", "--method", "npe-nsf", "--reuse"], "--reuse"),
    ],
)
def test_sbi_cli_user_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = main(["sbi", *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("freeflows: error:") and message in err and len(err.strip().splitlines()) == 1


def test_pair_plot_handles_higher_dimensions(tmp_path):
    from freeflows.experiments.sbi import pair_plot

    g = torch.Generator().manual_seed(0)
    path = pair_plot(
        torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g), tmp_path / "p.png", "t"
    )
    assert path.is_file() and path.stat().st_size > 1000


def test_reuse_ignores_the_beta_auto_section_unless_beta_adapts(tmp_path):
    from freeflows.experiments.config import load_config, save_config
    from freeflows.experiments.sbi import trained_run_differences

    saved = load_config("sbi-two_moons", ["beta_auto.target=0.06"])
    save_config(saved, tmp_path / "config.yaml")
    (tmp_path / "metrics.json").write_text("{}")
    assert trained_run_differences(tmp_path, load_config("sbi-two_moons")) == []
    adaptive = load_config("sbi-two_moons", ["model.fff.beta=auto"])
    assert "beta_auto.target" in trained_run_differences(tmp_path, adaptive)
