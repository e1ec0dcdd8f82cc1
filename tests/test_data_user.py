"""A user's own data through the tool: file formats, bad files, splits, standardisation, the
``train --data`` / ``sample`` / ``evaluate`` / ``log-prob`` commands."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from freeflows.cli import main
from freeflows.data.user import (
    DataFileError,
    file_sha256,
    load_file,
    read_data_file,
    read_rows_for,
    split_sizes,
)
from freeflows.experiments.config import load_config, save_config
from freeflows.experiments.datasets import resolve_file_data
from freeflows.experiments.registry import build_model
from freeflows.standardized import StandardizedModel
from freeflows.transforms.standardize import Standardizer

QUIET = ["--set", "trainer.progress_bar=false", "--set", "trainer.plot=false"]
MEAN, STD = np.array([10.0, -4.0]), np.array([20.0, 0.5])


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("freeflows: error:"), err
    return err[0]


def _gaussian(n: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 2)) * STD + MEAN


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- reading files ------------------------------------------------------------------------------
def test_npy_npz_and_csv_are_read_with_their_conditions(tmp_path):
    x = _gaussian(20)
    np.save(tmp_path / "a.npy", x.astype(np.float32))
    table = read_data_file(tmp_path / "a.npy")
    assert table.x.shape == (20, 2) and table.c is None
    np.testing.assert_allclose(table.x, x.astype(np.float32))

    c = np.arange(20.0)
    np.savez(tmp_path / "b.npz", x=x, c=c)  # a 1-D c is one condition per row
    table = read_data_file(tmp_path / "b.npz")
    np.testing.assert_array_equal(table.x, x)
    np.testing.assert_array_equal(table.c, c[:, None])

    rows = "\n".join(f"{a},{k},{b}" for (a, b), k in zip(x, c, strict=True))
    _csv(tmp_path / "c.csv", "u, label ,v\n" + rows + "\n\n")
    table = read_data_file(tmp_path / "c.csv", ["label"])
    assert table.feature_names == ["u", "v"] and table.condition_names == ["label"]
    np.testing.assert_allclose(table.x, x)
    np.testing.assert_array_equal(table.c, c[:, None])
    assert read_data_file(tmp_path / "c.csv").x.shape == (20, 3)  # no condition columns: all features


def _bad_files(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra train arguments, the text the one-line error must hold)."""
    x = _gaussian(50)
    nan = x.copy()
    nan[[3, 17], 1] = np.nan
    nan[40, 0] = np.inf
    np.save(tmp / "nan.npy", nan)
    np.save(tmp / "rank3.npy", np.zeros((50, 2, 2)))
    np.save(tmp / "rank1.npy", np.zeros(50))
    np.save(tmp / "empty.npy", np.zeros((0, 2)))
    np.save(tmp / "text.npy", np.array([["a", "b"]] * 50))
    np.save(tmp / "few.npy", x[:4])
    (tmp / "corrupt.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    (tmp / "junk.npy").write_bytes(b"not a numpy file at all")
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04 garbage")
    np.savez(tmp / "nox.npz", samples=x)
    np.savez(tmp / "badc.npz", x=x, c=np.zeros(49))
    np.savez(tmp / "nanc.npz", x=x, c=np.where(np.arange(50) == 7, np.nan, 0.0))
    _csv(tmp / "word.csv", "a,b,kind\n1,2,3\n4,5,six\n")
    _csv(tmp / "nohead.csv", "1,2\n3,4\n")
    _csv(tmp / "ragged.csv", "a,b\n1,2\n3\n")
    _csv(tmp / "blank.csv", "")
    _csv(tmp / "header_only.csv", "a,b\n")
    _csv(tmp / "nan.csv", "a,b\n" + "1,2\n" * 10 + "nan,1\n" + "1,2\n" * 10)
    (tmp / "latin1.csv").write_bytes("a,\xe9\n1,2\n".encode("latin-1"))
    _csv(tmp / "table.txt", "a,b\n1,2\n")
    np.save(tmp / "ok.npy", x)
    return {
        "nan.npy": ([], "rows 3, 17, 40 (counting from 0)"),
        "rank3.npy": ([], "shape (50, 2, 2); it must be 2-D"),
        "rank1.npy": ([], "reshape it to [N, 1]"),
        "empty.npy": ([], "empty.npy is empty"),
        "text.npy": ([], "is not numeric"),
        "few.npy": ([], "too few rows in few.npy: its 4 rows split into 4 training, 0 validation"),
        "corrupt.npy": ([], "cannot read corrupt.npy as a .npy file"),
        "junk.npy": ([], "does not start with the NPY header"),
        "corrupt.npz": ([], "cannot read corrupt.npz as an .npz file"),
        "nox.npz": ([], "has no array 'x' (it holds: samples)"),
        "badc.npz": ([], "array 'c' has 49 rows but 'x' has 50"),
        "nanc.npz": ([], "NaN or infinite condition values (or beyond float32) on row 7"),
        "word.csv": ([], "column 'kind' of word.csv is not numeric (line 3: 'six')"),
        "nohead.csv": ([], "has no header"),
        "ragged.csv": ([], "line 3 of ragged.csv has 1 fields but the header has 2"),
        "blank.csv": ([], "blank.csv is empty"),
        "header_only.csv": ([], "has a header but no data rows"),
        "nan.csv": ([], "on line 12;"),
        "latin1.csv": ([], "is not UTF-8 text"),
        "table.txt": ([], "unknown extension '.txt'"),
        "missing.npy": ([], "does not exist"),
        "ok.npy": (["--condition-columns", "a"], "condition columns name columns of a .csv header"),
        "word.csv#cols": (["--condition-columns", "kind,size"], "condition column 'size' not in the header"),
        "ok.npy#split": (["--set", "data.options.test=1.5"], "data.options.test=1.5 must be a fraction"),
        "ok.npy#option": (["--set", "data.options.tests=0.1"], "unknown data.options tests"),
    }


def test_every_bad_file_is_one_line_exit_2_and_leaves_no_run(capsys, tmp_path):
    cases = _bad_files(tmp_path)
    for name, (extra, needle) in cases.items():
        run = tmp_path / f"run-{name}"
        code = main(["train", "--data", str(tmp_path / name.split("#")[0]), *extra, "--out", str(run)])
        line = _one_line_error(capsys, code)
        assert needle in line, (name, line)
        assert not run.exists(), name
    # `freeflows train FILE` reads FILE as data, not as a YAML config
    line = _one_line_error(capsys, main(["train", str(tmp_path / "nan.npy"), "--out", str(tmp_path / "r")]))
    assert "rows 3, 17, 40" in line


def test_a_data_file_as_the_config_or_as_data_name_says_how_to_use_it(capsys, tmp_path):
    with pytest.raises(ValueError, match="is a data file, not a config"):
        load_config("my.npy")
    line = _one_line_error(
        capsys, main(["train", "tiny", "--set", "data.name=my.npy", "--out", str(tmp_path)])
    )
    assert "freeflows train --data my.npy" in line
    line = _one_line_error(capsys, main(["train", "tiny", "--condition-columns", "a"]))
    assert "--condition-columns needs --data" in line
    line = _one_line_error(capsys, main(["train", "--resume", str(tmp_path), "--data", "x.npy"]))
    assert "do not go with --resume" in line


# -- splits -------------------------------------------------------------------------------------
def test_split_sizes_from_fractions_and_row_counts():
    assert split_sizes(1000, 0.1, 0.1) == (800, 100, 100)
    assert split_sizes(1000, 50, 0.25) == (700, 50, 250)
    assert split_sizes(4, 1, 1) == (2, 1, 1)
    with pytest.raises(DataFileError, match="too few rows"):
        split_sizes(3, 1, 1)
    with pytest.raises(DataFileError, match="fraction or a row count"):
        split_sizes(100, "a lot", 0.1)
    with pytest.raises(DataFileError, match="too few rows"):
        split_sizes(100, 0.0, 0.1)  # validation needs a row


def test_splits_are_seeded_disjoint_and_cover_the_file(tmp_path):
    x = np.arange(200.0).reshape(100, 2)
    np.save(tmp_path / "a.npy", x)
    options = {"path": str(tmp_path / "a.npy"), "val": 10, "test": 0.2}
    data = load_file(options, seed=3)
    assert (len(data.train), len(data.val), len(data.test)) == (70, 10, 20)
    rows = torch.cat([data.train.x, data.val.x, data.test.x])[:, 0].long().tolist()
    assert sorted(rows) == list(range(0, 200, 2))
    assert torch.equal(load_file(options, seed=3).test.x, data.test.x)
    assert not torch.equal(load_file(options, seed=4).test.x, data.test.x)


# -- standardisation ----------------------------------------------------------------------------
def _wrapped(dtype=torch.float64, condition_dim=None) -> StandardizedModel:
    torch.manual_seed(1)
    inner = build_model({"kind": "realnvp", "realnvp": {"transforms": 2, "hidden": 16}}, (2,), condition_dim)
    with torch.no_grad():  # random, far from identity weights: a non-Gaussian density
        for p in inner.parameters():
            p.normal_(0, 0.3)
    std = Standardizer(torch.tensor(MEAN), torch.tensor(STD))
    return StandardizedModel(inner, std).to(dtype)


def test_standardized_log_prob_is_the_inner_one_minus_sum_log_sigma():
    model = _wrapped()
    x = torch.from_numpy(_gaussian(64))
    u = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    expected = model.model.log_prob(u) - math.log(20.0) - math.log(0.5)
    torch.testing.assert_close(model.log_prob(x), expected, rtol=0, atol=1e-12)


def test_standardized_density_integrates_to_what_the_inner_one_does():
    r"""A Riemann sum of :math:`\exp\log q` over a grid in original units, and of the inner density
    over the same grid in standardised units: equal, and both close to 1."""
    model = _wrapped()
    n = 400
    u1 = torch.linspace(-9, 9, n, dtype=torch.float64)
    gu = torch.stack(torch.meshgrid(u1, u1, indexing="ij"), -1).reshape(-1, 2)
    gx = gu * torch.tensor(STD) + torch.tensor(MEAN)
    du = (u1[1] - u1[0]) ** 2
    dx = du * float(np.prod(STD))
    with torch.no_grad():
        mass_std = float(model.model.log_prob(gu).exp().sum() * du)
        mass_orig = float(model.log_prob(gx).exp().sum() * dx)
    assert mass_orig == pytest.approx(mass_std, abs=1e-9)
    assert mass_orig == pytest.approx(1.0, abs=0.02)


def test_standardized_samples_are_in_original_units_and_conditions_are_standardised():
    model = _wrapped()
    torch.manual_seed(5)
    x = model.sample(300)
    torch.manual_seed(5)
    u = model.model.sample(300)
    torch.testing.assert_close(x, u * torch.tensor(STD) + torch.tensor(MEAN))
    xs, log_q = model.sample_and_log_prob(50)
    torch.testing.assert_close(log_q, model.log_prob(xs), rtol=1e-6, atol=1e-6)

    seen = []

    class Recorder(torch.nn.Module):
        condition_dim = 1

        def log_prob(self, x, c=None):
            seen.append(c)
            return x.sum(-1)

    c_std = Standardizer(torch.tensor([100.0]), torch.tensor([10.0]))
    wrapped = StandardizedModel(Recorder(), Standardizer(torch.zeros(2), torch.ones(2)), c_std)
    wrapped.log_prob(torch.zeros(3, 2), torch.tensor([[90.0], [100.0], [120.0]]))
    torch.testing.assert_close(seen[0], torch.tensor([[-1.0], [0.0], [2.0]]))
    assert not hasattr(wrapped, "rsample")


def test_standardization_is_fitted_on_the_training_split_only(tmp_path):
    x = _gaussian(400)
    np.save(tmp_path / "a.npy", x)
    data = load_file({"path": str(tmp_path / "a.npy")}, seed=0)
    st = data.meta["standardizer"]
    torch.testing.assert_close(st.mean, data.train.x.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.std, data.train.x.std(0), rtol=1e-5, atol=1e-5)
    assert load_file({"path": str(tmp_path / "a.npy"), "standardize": False}, seed=0).wrap_model is None


# -- the run's record of its file ---------------------------------------------------------------
def test_config_holds_absolute_path_and_hash_and_a_changed_file_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "my.npy", _gaussian(100))
    cfg = resolve_file_data(
        load_config("tiny", ["data.options.val=0.2"], {"name": "file", "options": {"path": "my.npy"}})
    )
    options = cfg["data"]["options"]
    assert cfg["data"]["name"] == "file" and options["path"] == str(tmp_path / "my.npy")
    assert options["sha256"] == file_sha256(tmp_path / "my.npy") and options["val"] == 0.2
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")

    x = _gaussian(100)
    x[0, 0] += 1
    np.save(tmp_path / "my.npy", x)
    line = _one_line_error(capsys, main(["sample", str(run)]))
    assert "has changed since the run was made" in line
    (tmp_path / "my.npy").unlink()
    line = _one_line_error(capsys, main(["evaluate", str(run)]))
    assert "no longer exists" in line


def test_rows_to_score_follow_the_runs_columns(tmp_path):
    _csv(tmp_path / "train.csv", "a,b,k\n" + "".join(f"{i},{2 * i},{i % 3}\n" for i in range(30)))
    data = load_file({"path": str(tmp_path / "train.csv"), "condition_columns": ["k"]}, seed=0)
    _csv(tmp_path / "new.csv", "k,b,a\n1,20,10\n2,40,20\n")  # other order: matched by name
    x, c = read_rows_for(data, tmp_path / "new.csv")
    torch.testing.assert_close(x, torch.tensor([[10.0, 20.0], [20.0, 40.0]]))
    torch.testing.assert_close(c, torch.tensor([[1.0], [2.0]]))
    _csv(tmp_path / "extra.csv", "a,b,k,id\n1,2,0,7\n")
    with pytest.raises(DataFileError, match="'id' that the run was not trained on"):
        read_rows_for(data, tmp_path / "extra.csv")
    np.save(tmp_path / "three.npy", np.zeros((4, 3)))
    with pytest.raises(DataFileError, match="3 feature columns per row but the run's model takes 2"):
        read_rows_for(data, tmp_path / "three.npy")
    np.save(tmp_path / "two.npy", np.zeros((4, 2)))
    with pytest.raises(DataFileError, match="conditional .* gives none"):
        read_rows_for(data, tmp_path / "two.npy")


# -- end to end ---------------------------------------------------------------------------------
def test_train_sample_evaluate_resume_and_log_prob_on_a_npy_file(capsys, tmp_path, monkeypatch, one_thread):
    x = _gaussian(3000).astype(np.float32)
    np.save(tmp_path / "my.npy", x)
    run = tmp_path / "run"
    args = ["--set", "trainer.max_steps=100", "--set", "trainer.batch_size=128"]
    assert main(["train", "--data", str(tmp_path / "my.npy"), "tiny", "--out", str(run), *args, *QUIET]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # a Gaussian with these scales has entropy log(2 pi e) + sum log sigma: the NLL is in data units
    entropy = math.log(2 * math.pi * math.e) + float(np.log(STD).sum())
    assert abs(metrics["test_nll"] - entropy) < 0.5, metrics["test_nll"]

    capsys.readouterr()
    assert main(["sample", str(run), "-n", "4000", "-o", str(tmp_path / "s.npy")]) == 0
    s = np.load(tmp_path / "s.npy")
    assert (np.abs(s.mean(0) - MEAN) < 0.3 * STD).all(), s.mean(0)
    assert (np.abs(s.std(0) / STD - 1) < 0.3).all(), s.std(0)
    capsys.readouterr()

    assert main(["evaluate", str(run), "--no-plots"]) == 0
    assert json.loads(capsys.readouterr().out)["test_nll"] == pytest.approx(metrics["test_nll"], abs=1e-4)
    assert main(["train", "--resume", str(run), "--set", "trainer.max_steps=120", *QUIET]) == 0

    out = tmp_path / "lp.npy"
    capsys.readouterr()
    assert main(["log-prob", str(run), str(tmp_path / "my.npy"), "-o", str(out), "--batch-size", "700"]) == 0
    assert "wrote the log-density" in capsys.readouterr().out
    log_q = np.load(out)
    assert log_q.shape == (3000,) and np.isfinite(log_q).all()
    from freeflows.runner.train import load_run

    _, _, model = load_run(run)
    with torch.no_grad():
        direct = model.log_prob(torch.from_numpy(x[:50])).numpy()
    np.testing.assert_allclose(log_q[:50], direct, rtol=1e-5, atol=1e-5)

    # rows whose log_prob is NaN (an unconverged density solve) stay NaN and are counted
    original = StandardizedModel.log_prob

    def some_nan(self, x, c=None, **kwargs):
        out = original(self, x, c, **kwargs)
        return torch.where(x[:, 0] > 30.0, torch.nan, out)

    monkeypatch.setattr(StandardizedModel, "log_prob", some_nan)
    assert main(["log-prob", str(run), str(tmp_path / "my.npy"), "-o", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    n_nan = int((x[:, 0] > 30.0).sum())
    assert 0 < n_nan < 3000
    assert len(err) == 1 and f"{n_nan} of 3000 rows have no log-density" in err[0]
    log_q2 = np.load(out)
    np.testing.assert_array_equal(np.isnan(log_q2), x[:, 0] > 30.0)
    np.testing.assert_allclose(log_q2[x[:, 0] <= 14.0], log_q[x[:, 0] <= 14.0], rtol=1e-5, atol=1e-5)


def test_conditional_csv_with_another_model_kind(capsys, tmp_path, one_thread):
    rng = np.random.default_rng(0)
    k = rng.integers(0, 3, 1200).astype(float)
    a = rng.normal(size=1200) + 5 * k
    b = rng.normal(size=1200) * 0.1 - 50
    _csv(tmp_path / "d.csv", "a,k,b\n" + "".join(f"{u},{v},{w}\n" for u, v, w in zip(a, k, b, strict=True)))
    run = tmp_path / "run"
    args = ["--condition-columns", "k", "--set", "model.kind=realnvp", "--set", "trainer.max_steps=30"]
    assert main(["train", "--data", str(tmp_path / "d.csv"), "tiny", "--out", str(run), *args, *QUIET]) == 0
    assert "condition_columns:\n    - k" in (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["sample", str(run), "-n", "200", "--condition", "2", "-o", str(tmp_path / "s.npy")]) == 0
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (200, 2) and np.isfinite(s).all()
    assert abs(np.median(s[:, 1]) + 50) < 5  # column b comes back in its own units
    out = tmp_path / "lp.npy"
    assert main(["log-prob", str(run), str(tmp_path / "d.csv"), "-o", str(out)]) == 0
    log_q = np.load(out)
    assert log_q.shape == (1200,) and np.isfinite(log_q).all()
    from freeflows.runner.train import load_run

    _, data, model = load_run(run)
    rows = read_rows_for(data, tmp_path / "d.csv")
    with torch.no_grad():
        direct = model.log_prob(*rows)
    np.testing.assert_allclose(log_q, direct.numpy(), rtol=1e-5, atol=1e-5)
