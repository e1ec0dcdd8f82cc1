"""`freeflows bench`: runs a benchmark module and writes its JSON and Markdown table; a bad name is
a one-line usage error (exit 2)."""

import json

import pytest

from freeflows.cli import main


def test_bench_sampling_quick_writes_json_and_markdown(tmp_path, capsys):
    assert main(["bench", "sampling", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sampling.json").read_text())
    table = (tmp_path / "sampling.md").read_text()
    assert result["quick"] is True
    # every model of the sampling benchmark has a positive, finite rate in the table
    for model in ("fff", "fff, 20 refine steps", "realnvp", "maf", "cnf"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {model} |"))
        rates = [float(v) for v in row.strip("|").split("|")[1:3]]
        assert all(0 < r < float("inf") for r in rates), row
    assert "wrote" in capsys.readouterr().out


def test_bench_unknown_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "no-such-benchmark"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "train_step" in err and "Traceback" not in err
