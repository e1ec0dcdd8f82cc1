"""QM9 data (freeflows.data.qm9): the shipped slice, the Molecules batch, EDM's split rule and
the cache (path, corrupt files, rebuild). Tests that read the full data need qm9pack and are slow."""

from __future__ import annotations

import doctest
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from freeflows.data import qm9
from freeflows.data.qm9 import (
    ELEMENTS,
    MAX_ATOMS,
    Molecules,
    atom_count_histogram,
    cache_path,
    load_qm9,
    qm9_slice,
    split_indices,
)

HAS_QM9PACK = importlib.util.find_spec("qm9pack") is not None
needs_qm9pack = pytest.mark.skipif(not HAS_QM9PACK, reason="needs qm9pack: pip install freeflows[molecules]")


def test_examples_run():
    result = doctest.testmod(qm9, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_slice_loads_without_qm9pack_pandas_or_rdkit():
    code = (
        "import sys\n"
        "for m in ('qm9pack', 'pandas', 'rdkit'):\n"
        "    sys.modules[m] = None\n"
        "from freeflows.data.qm9 import qm9_slice\n"
        "m = qm9_slice()\n"
        "print(len(m), len(qm9_slice('train')), len(qm9_slice('test')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["400", "300", "100"]


def test_slice_is_consistent():
    m = qm9_slice()
    assert m.positions.dtype == torch.float32 and m.types.dtype == torch.int64
    assert m.positions.shape == (400, MAX_ATOMS, 3) and m.types.shape == (400, MAX_ATOMS)
    n = m.n_atoms
    assert n.min() >= 3 and n.max() <= MAX_ATOMS
    slots = torch.arange(MAX_ATOMS)
    assert torch.equal(m.mask, slots < n[:, None])  # real atoms first
    assert (m.positions[~m.mask] == 0).all()
    assert ((m.types[m.mask] >= 0) & (m.types[m.mask] < len(ELEMENTS))).all()
    # The heavy atoms in each SMILES (upper case: aliphatic, lower case: aromatic) are the molecule's.
    for row in range(len(m)):
        smiles = m.smiles[row]
        from_smiles = sorted(c.upper() for c in smiles if c in "CcNnOoF")
        from_types = sorted(ELEMENTS[t] for t in m.types[row][m.mask[row]].tolist() if t > 0)
        assert from_smiles == from_types, (row, smiles)
    # Geometry in ångström: every atom has a neighbour between 0.9 and 1.6 Å.
    d = torch.cdist(m.positions.double(), m.positions.double())
    pair = m.mask[:, :, None] & m.mask[:, None, :] & ~torch.eye(MAX_ATOMS, dtype=torch.bool)
    d = d.masked_fill(~pair, 1e9)
    nearest = d.min(-1).values[m.mask]
    assert nearest.min() > 0.9 and nearest.max() < 1.6


def test_slice_splits_and_bad_split():
    train, test, both = qm9_slice("train"), qm9_slice("test"), qm9_slice()
    assert torch.equal(both.positions[:300], train.positions) and both.smiles[300:] == test.smiles
    with pytest.raises(ValueError, match="split must be one of"):
        qm9_slice("val")
    with pytest.raises(ValueError, match="split must be one of"):
        load_qm9("validation")


def test_molecules_indexing():
    m = qm9_slice()
    s = m[10:20]
    assert len(s) == 10 and s.smiles == m.smiles[10:20] and torch.equal(s.types, m.types[10:20])
    one = m[7]
    assert len(one) == 1 and one.smiles == [m.smiles[7]] and torch.equal(one.positions[0], m.positions[7])
    idx = torch.tensor([5, 0, 5])
    picked = m[idx]
    assert picked.smiles == [m.smiles[5], m.smiles[0], m.smiles[5]]
    assert torch.equal(picked.positions, m.positions[idx]) and torch.equal(picked.n_atoms, m.n_atoms[idx])
    assert m[np.int64(7)].smiles == m[torch.tensor(7)].smiles == [m.smiles[7]]
    assert m[[3, 4]].smiles == m.smiles[3:5] and m[np.array([3, 4])].smiles == m.smiles[3:5]
    keep = m.n_atoms > 20
    big = m[keep]
    assert len(big) == int(keep.sum()) and (big.n_atoms > 20).all()
    assert len(m[torch.zeros(len(m), dtype=torch.bool)]) == 0
    with pytest.raises(ValueError, match="boolean index"):
        m[torch.ones(3, dtype=torch.bool)]
    with pytest.raises(ValueError, match="index molecules"):
        m[torch.tensor([0.5])]


def test_molecules_checks_its_fields():
    m = qm9_slice()[:2]
    with pytest.raises(ValueError, match="positions must have shape"):
        Molecules(m.positions[:, :10], m.types[:, :10], m.smiles)
    with pytest.raises(ValueError, match="types must be int64"):
        Molecules(m.positions, m.types.int(), m.smiles)
    with pytest.raises(ValueError, match="SMILES for 2 molecules"):
        Molecules(m.positions, m.types, m.smiles[:1])


def test_centered_moves_only_real_atoms():
    m = qm9_slice()[:50]
    c = m.centered()
    mean = (c.positions * m.mask[..., None]).sum(1) / m.n_atoms[:, None]
    assert mean.abs().max() < 1e-5
    assert (c.positions[~m.mask] == 0).all()
    # Distances between real atoms are unchanged.
    i = 3
    n = int(m.n_atoms[i])
    assert torch.allclose(torch.cdist(c.positions[i, :n], c.positions[i, :n]),
                          torch.cdist(m.positions[i, :n], m.positions[i, :n]), atol=1e-5)


def test_atom_count_histogram():
    m = qm9_slice()
    h = atom_count_histogram(m)
    assert h.shape == (MAX_ATOMS + 1,) and abs(float(h.sum()) - 1) < 1e-12
    for n in (9, 18, 25):
        assert float(h[n]) == pytest.approx(float((m.n_atoms == n).double().mean()))
    with pytest.raises(ValueError, match="at least one molecule"):
        atom_count_histogram(m[:0])


def test_split_rule_is_edms():
    """train, val, test = consecutive slices of np.random.seed(0); np.random.permutation(130831)."""
    np.random.seed(0)
    perm = np.random.permutation(130831)
    train, val, test = (split_indices(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (100_000, 17_748, 13_083)
    assert np.array_equal(train, perm[:100_000])
    assert np.array_equal(val, perm[100_000:117_748])
    assert np.array_equal(test, perm[117_748:])
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(130831))


def test_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("FREEFLOWS_CACHE", str(tmp_path / "env"))
    assert cache_path() == tmp_path / "env" / "qm9.npz"
    assert cache_path(tmp_path) == tmp_path / "qm9.npz"
    assert cache_path(tmp_path / "x.npz") == tmp_path / "x.npz"
    monkeypatch.delenv("FREEFLOWS_CACHE")
    assert cache_path().parts[-3:] == (".cache", "freeflows", "qm9.npz")


@pytest.fixture
def without_qm9pack(monkeypatch):
    real = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == "qm9pack" else real(name, *args)

    monkeypatch.setattr(qm9.importlib.util, "find_spec", find_spec)


def test_missing_qm9pack_names_the_extra(tmp_path, without_qm9pack):
    with pytest.raises(ModuleNotFoundError, match=r"pip install freeflows\[molecules\]"):
        load_qm9("train", tmp_path)


@pytest.mark.parametrize("content", [b"not a zip file", b""])
def test_corrupt_cache_is_a_clear_error_without_qm9pack(tmp_path, without_qm9pack, content):
    (tmp_path / "qm9.npz").write_bytes(content)
    with pytest.raises(ValueError, match=r"qm9\.npz is not a readable QM9 file.*delete it"):
        load_qm9("test", tmp_path)


def test_wrong_cache_is_a_clear_error_without_qm9pack(tmp_path, without_qm9pack):
    (tmp_path / "qm9.npz").write_bytes(qm9.SLICE_FILE.read_bytes())  # valid format, 400 molecules
    with pytest.raises(ValueError, match="400 molecules, expected 130831"):
        load_qm9("test", tmp_path)


@pytest.fixture(scope="module")
def qm9_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("qm9cache")


@pytest.mark.slow
@needs_qm9pack
def test_full_splits_and_the_shipped_slice(qm9_cache):
    splits = {s: load_qm9(s, qm9_cache) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [100_000, 17_748, 13_083]
    assert sum(int(m.n_atoms.max() == MAX_ATOMS) for m in splits.values()) == 3
    # The shipped slice is the head of the train and test splits.
    for name, part in (("train", qm9_slice("train")), ("test", qm9_slice("test"))):
        head = splits[name][: len(part)]
        assert torch.equal(head.positions, part.positions) and torch.equal(head.types, part.types)
        assert head.smiles == part.smiles
    with np.load(cache_path(qm9_cache)) as f:
        index = f["index"]
    assert index.size == 130831 and (np.diff(index) > 0).all() and index[0] == 1 and index[-1] == 133885
    assert splits["train"].smiles[:2] == ["CC1=C(F)N=NOC1=N", "OC12CC1OC2CC#C"]


@pytest.mark.slow
@needs_qm9pack
def test_corrupt_cache_is_rebuilt(tmp_path):
    path = cache_path(tmp_path)
    path.write_bytes(b"PK\x03\x04 truncated")
    test = load_qm9("test", tmp_path)
    assert len(test) == 13_083
    with np.load(path) as f:
        assert f["n_atoms"].size == 130831
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
