"""`freeflows bench`: every registered benchmark runs with `--quick` and writes its JSON and Markdown
table; a bad name is a one-line usage error (exit 2). The trained sections' timing and the reuse
of run directories are checked on untrained models and fake runs, without training."""

import json
import math

import pytest
import torch

from freeflows.bench import BENCHMARKS, common, density_cost, sampling
from freeflows.cli import main

#: Benchmarks whose quick run takes more than 10 s (they train models, or compile).
SLOW = {"train_step", "surrogate_modes", "density_cost", "sampling"}
#: Benchmarks whose quick run is checked by a test of its own.
OWN_TEST = {"autoregressive_timing", "sampling"}


def _rows(table, first):
    """The cells after the first of the Markdown table row starting with ``| first |``."""
    line = next(line for line in table.splitlines() if line.startswith(f"| {first} |"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")[1:]]


def _run_quick(name, tmp_path, capsys):
    """``freeflows bench NAME --quick``: exit 0, the JSON and its Markdown table written."""
    assert main(["bench", name, "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"{name}.json").read_text())
    table = (tmp_path / f"{name}.md").read_text()
    assert result["quick"] is True
    assert result["markdown"].strip() == table.strip()
    assert "|---" in table
    assert f"wrote {tmp_path / name}.json and .md" in capsys.readouterr().out
    return result


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in BENCHMARKS if n not in OWN_TEST],
)
def test_every_benchmark_runs_quick_and_writes_json_and_markdown(name, tmp_path, capsys):
    _run_quick(name, tmp_path, capsys)


def test_autoregressive_timing_quick_times_every_model_both_ways(tmp_path, capsys):
    result = _run_quick("autoregressive_timing", tmp_path, capsys)
    assert result["clock"] == "process_time"
    rows = {(r["kind"], r["dim"]): r for r in result["rows"]}
    assert set(rows) == {(k, d) for k in ("maf", "iaf", "realnvp", "fff") for d in (2, 16)}
    for r in rows.values():
        assert 0 < r["sample_seconds"] < math.inf and 0 < r["density_seconds"] < math.inf, r
    # MAF samples with D sequential passes: at D = 16 sampling is slower than its density
    assert result["ratios"]["16"]["maf_sample_over_maf_density"] > 2
    table = (tmp_path / "autoregressive_timing.md").read_text()
    assert "Command: `freeflows bench autoregressive_timing --quick`" in table


def test_bench_sampling_untrained_section(tmp_path):
    result = sampling.run(str(tmp_path), quick=True, untrained_only=True)
    table = (tmp_path / "sampling.md").read_text()
    assert result["trained_results"] is None
    assert not (tmp_path / "sampling_speed.json").exists()
    # every model of the sampling benchmark has a positive, finite rate in the table
    for model in ("fff", "fff, 20 refine steps", "realnvp", "maf", "cnf"):
        rates = [float(v) for v in _rows(table, model)[:2]]
        assert all(0 < r < math.inf for r in rates), (model, rates)


@pytest.mark.slow
def test_bench_sampling_quick_trains_and_compares_the_trained_models(tmp_path, capsys):
    _run_quick("sampling", tmp_path, capsys)
    trained = json.loads((tmp_path / "sampling_speed.json").read_text())
    assert set(trained["models"]) == {"cnf", "rnode", "fff"}
    assert trained["models"]["fff"]["nfe_per_sample"] == 1
    assert trained["models"]["cnf"]["nfe_per_sample"] > 1
    assert trained["models"]["rnode"]["model_options"]["kinetic"] > 0
    # the untrained section collects the trained rows
    collected = json.loads((tmp_path / "sampling.json").read_text())["collected"]
    assert {r["model"] for r in collected if r["source"] == "sampling_speed.json"} == {"cnf", "rnode", "fff"}


def test_sampling_compare_times_models_side_by_side():
    from freeflows import CNF, FreeFormFlow

    torch.manual_seed(0)
    models = {"cnf": CNF(2).eval(), "fff": FreeFormFlow.resnet(2).eval()}
    out = sampling.compare(models, batch=64, repeats=3)
    assert out["fff"]["nfe_per_sample"] == 1 and out["cnf"]["nfe_per_sample"] > 1
    assert out["fff"]["fff_speedup"] == 1.0 and out["fff"]["fff_speedup_paired"] == 1.0
    for row in out.values():
        assert len(row["seconds"]) == 3
        assert row["samples_per_second_min"] <= row["samples_per_second"] <= row["samples_per_second_max"]
    text = sampling.trained_markdown(
        {
            "seed": 0,
            "batch": 64,
            "repeats": 3,
            "clock": common.CLOCK,
            "models": {
                k: {**v, "test_nll": 1.0, "test_nll_stderr": None, "steps": 3, "train_seconds": None}
                for k, v in out.items()
            },
        }
    )
    assert "(CPU time)" in text and _rows(text, "free-form flow")[-2] == "1.0×"
    with pytest.raises(ValueError, match="'fff'"):
        sampling.compare({"cnf": models["cnf"]}, batch=8, repeats=1)


def test_sampling_trained_runs_must_be_three(tmp_path):
    with pytest.raises(ValueError, match="give 3 run directories"):
        sampling.trained_runs(False, tmp_path, [tmp_path])


def test_density_cost_measure_compares_the_two_densities():
    from freeflows import FreeFormFlow

    torch.manual_seed(0)
    model = FreeFormFlow.resnet(2)
    row = density_cost.measure(model, torch.randn(50, 2), repeats=3)
    assert row["dim"] == 2 and row["rows"] == 50 and row["unsolved"] == 0
    assert 0 < row["cpu_seconds_normalised"] and 0 < row["cpu_seconds_paper"]
    assert 0 < row["ratio"] < math.inf
    # an untrained ResNet is the identity: both densities are the latent's, and agree
    assert row["mean_abs_difference"] < 1e-4
    table = density_cost.markdown({"rows": [{"data": "toy", **row}]})
    assert _rows(table, "toy")[:2] == ["2", "50"]


def test_trained_run_reuses_a_finished_run_and_refuses_anything_else(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model:\n  kind: cnf\ndata:\n  name: two-moons\n")
    with pytest.raises(ValueError, match="no finished run"):
        common.trained_run("two-moons", run_dir)
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="model.kind = 'cnf'"):
        common.trained_run("two-moons", run_dir)
    assert common.trained_run("cnf-two-moons", run_dir) == run_dir
    assert f"reusing the run in {run_dir}" in capsys.readouterr().out


def test_bench_unknown_name_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "no-such-benchmark"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err
    assert "no-such-benchmark" in errors[0]
    assert all(name in errors[0] for name in BENCHMARKS)
