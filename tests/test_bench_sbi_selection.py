"""benchmarks/sbi_selection.py: the selection rule on hand-made rows, the merge of the results
file, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sbi_selection.py"


def _load():
    spec = importlib.util.spec_from_file_location("sbi_selection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sel = _load()


def _row(beta, k, nll, mass, mass_stderr=0.05, unsolved=0, n_val=1000, task="two_moons"):
    return {
        "task": task,
        "budget": 10000,
        "seed": 0,
        "beta": float(beta),
        "sample_refine_steps": k,
        "density_of_draws": "encoder" if k else "decoder",
        "n_val": n_val,
        "val_nll": nll,
        "val_unsolved_rows": unsolved,
        "val_mass": mass,
        "val_mass_stderr": mass_stderr,
    }


def test_an_unnormalised_density_with_a_lower_nll_is_not_selected():
    encoder = _row(300, 20, -2.45, 1.95, 0.10)  # lowest NLL, mass far from one
    decoder = _row(300, 0, -2.25, 0.94, 0.16, unsolved=22)
    other = _row(100, 0, 4.04, 0.92, 0.24, unsolved=46)
    assert not sel.trusted(encoder) and sel.trusted(decoder) and sel.trusted(other)
    assert sel.select([encoder, other, decoder]) is decoder


def test_the_tolerance_and_the_unsolved_rows_limit():
    assert sel.trusted(_row(1, 0, 0.0, 1.04, 0.001))  # within 0.05 even with a tiny stderr
    assert not sel.trusted(_row(1, 0, 0.0, 1.06, 0.001))
    assert sel.trusted(_row(1, 0, 0.0, 1.25, 0.1))  # within 3 s.e.
    assert not sel.trusted(_row(1, 0, 0.0, 1.0, unsolved=51))  # 5.1 % of the rows unsolved
    assert sel.trusted(_row(1, 20, 0.0, 1.0, unsolved=51))  # the limit is the decoder's
    assert not sel.trusted(_row(1, 0, None, 1.0))
    assert not sel.trusted(_row(1, 0, 0.0, None))


def test_no_trusted_row_selects_nothing():
    rows = [_row(300, 20, -2.45, 1.95, 0.10), _row(300, 0, -2.25, 0.5, 0.1, unsolved=200)]
    assert sel.select(rows) is None
    assert sel.select([]) is None


def test_a_new_row_replaces_its_key_and_keeps_the_others():
    old = [_row(300, 20, -2.4, 2.0), _row(300, 0, -2.2, 1.0), _row(300, 0, -2.2, 1.0, task="slcp")]
    new = [_row(300, 0, -9.0, 1.0), _row(100, 0, -1.0, 1.0)]
    merged = sel.merge_rows(old, new)
    assert [(r["task"], r["beta"], r["sample_refine_steps"], r["val_nll"]) for r in merged] == [
        ("two_moons", 300.0, 20, -2.4),
        ("two_moons", 300.0, 0, -9.0),
        ("slcp", 300.0, 0, -2.2),
        ("two_moons", 100.0, 0, -1.0),
    ]


@pytest.mark.parametrize("argv", [["--tasks", "no_such_task"], ["--betas", "0"], ["--betas", "-3"]])
def test_bad_input_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        sel.parse_args(argv)
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()[-1]) > 0


@pytest.mark.slow
def test_quick_run_on_two_moons(tmp_path):
    code = sel.main(
        ["--quick", "--tasks", "two_moons", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)]
    )
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "sbi_selection.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["task"] == "two_moons"]
    assert len(mine) == 2
    assert sorted(r["density_of_draws"] for r in mine) == ["decoder", "encoder"]
    for r in mine:
        assert math.isfinite(r["val_nll"]) and math.isfinite(r["val_mass"])
        assert r["mean_c2st"] is not None and len(r["c2st_per_observation"]) == 1
    assert "two_moons" in (tmp_path / "sbi_selection.md").read_text()


@pytest.mark.slow
def test_c2st_selected_scores_only_the_selected_setting(tmp_path):
    argv = ["--quick", "--tasks", "two_moons", "--betas", "100", "300", "--c2st", "selected"]
    code = sel.main([*argv, "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "sbi_selection.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    scored = [r for r in rows if r["mean_c2st"] is not None]
    assert scored == [sel.select(rows)]
    assert all(r["train_seconds"] is not None for r in rows)


def test_a_row_with_overrides_is_a_setting_of_its_own():
    plain = _row(30, 0, 3.0, 1.0)
    capped = {**_row(30, 0, 2.9, 1.0), "overrides": ["trainer.max_steps=20000"]}
    merged = sel.merge_rows([plain], [capped])
    assert merged == [plain, capped]  # a row without the field has no overrides
    again = {**capped, "val_nll": 2.8}
    assert sel.merge_rows(merged, [again]) == [plain, again]
    assert sel.select(merged) is capped


@pytest.mark.parametrize("setting", ["model.fff.beta=3", "data.n_train=5", "trainer.no_such_key=1"])
def test_set_rejects_what_has_its_own_option_or_no_key(setting, capsys):
    with pytest.raises(SystemExit) as exc:
        sel.parse_args(["--tasks", "two_moons", "--set", setting])
    assert exc.value.code == 2
    assert setting.split("=")[0] in capsys.readouterr().err


def test_the_preset_row_is_the_preset_config_with_its_cap():
    # sbi-slcp_distractors: β 100, 20 refinement steps, capped at 20,000 steps
    base = {**_row(100, 20, 3.8, 1.1, task="slcp_distractors"), "steps": 20000}
    assert sel.is_preset({**base, "overrides": ["trainer.max_steps=20000"]})
    assert not sel.is_preset({**base, "steps": 60000})  # trained with the earlier 60,000-step cap
    assert not sel.is_preset({**base, "overrides": ["trainer.max_steps=30000"]})
    assert not sel.is_preset({**base, "beta": 30.0})
