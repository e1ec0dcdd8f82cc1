"""The model registry (freeflows.experiments.registry): every preset's model builds, every default
is the library constructor's, bad kinds and options are one clear error, and a kind is one line."""

from __future__ import annotations

import inspect

import pytest
import torch

from freeflows import CNF, RealNVP
from freeflows.experiments.config import ConfigError, list_presets, load_config
from freeflows.experiments.registry import MODEL_KINDS, build_model, model_defaults, register, vector

PARTICLES = {"dw4": (4, 2), "lj13": (13, 3)}


def data_shape(cfg: dict) -> tuple[tuple[int, ...], int | None, dict | None]:
    """Event shape, condition size and meta of a preset's data set, without loading it."""
    name = cfg["data"]["name"]
    if name in PARTICLES:
        n, d = PARTICLES[name]
        return (n * d,), None, {"n_particles": n, "n_dims": d}
    if name.startswith("sbi:"):
        sbibm = pytest.importorskip("sbibm")
        task = sbibm.get_task(name[4:])
        return (task.dim_parameters,), task.dim_data, None
    if name == "digits":
        return (1, 8, 8), None, None
    if name == "qm9":
        return (29, 9), 1, {"n_dims": 3}
    return (1,) if name == "gaussian-mixture-1d" else (2,), None, None


@pytest.mark.parametrize("preset", sorted(list_presets()))
def test_every_preset_builds_its_model(preset):
    cfg = load_config(preset)
    shape, condition_dim, meta = data_shape(cfg)
    model = build_model(cfg["model"], shape, condition_dim, meta)
    assert model.event_shape == shape
    assert model.condition_dim == condition_dim
    options = cfg["model"][cfg["model"]["kind"]]
    recorded = model._constructor[1]  # the arguments the constructor was called with
    for key, value in options.items():
        if key in ("kinetic", "jacobian"):
            assert recorded["regularization"][key] == value
        else:
            assert recorded[key] == value, key


def _signature_defaults(constructor) -> dict:
    target = constructor.__init__ if inspect.isclass(constructor) else constructor
    params = inspect.signature(target).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_defaults_are_the_constructors():
    defaults = model_defaults()
    kinds = ["fff", "planar", "nice", "realnvp", "glow", "maf", "iaf", "cnf", "fff-egnn", "ecnf", "fff-conv",
             "fff-molecules", "ecnf-molecules"]
    assert list(defaults) == kinds
    for name, kind in MODEL_KINDS.items():
        own = _signature_defaults(kind.constructor)
        for key, value in defaults[name].items():
            if key in own:
                assert own[key] == value, (name, key)
    cnf = _signature_defaults(CNF)
    for key in ("rtol", "max_num_steps", "trace"):
        assert defaults["ecnf"][key] == cnf[key]
    assert defaults["cnf"]["kinetic"] == defaults["cnf"]["jacobian"] == 0.0
    assert "regularization" not in defaults["cnf"]
    assert defaults["realnvp"] == _signature_defaults(RealNVP)
    # the config's model section is the registry's
    assert load_config("tiny")["model"]["cnf"] == defaults["cnf"]


def test_bad_kinds_and_options_are_one_line():
    with pytest.raises(ValueError, match="unknown model kind 'spline'; choose one of fff, planar") as err:
        build_model({"kind": "spline"}, (2,), None)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"unknown option\(s\) widht for realnvp; valid options: ") as err:
        build_model({"kind": "realnvp", "realnvp": {"widht": 3}}, (2,), None)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="the maf model works on vectors"):
        build_model({"kind": "maf"}, (1, 8, 8), None)
    with pytest.raises(ValueError, match="ecnf is unconditional"):
        build_model({"kind": "ecnf"}, (8,), 2, {"n_particles": 4, "n_dims": 2})
    with pytest.raises(ValueError, match="does not fit 4 particles in 3-D"):
        build_model({"kind": "fff-egnn"}, (8,), None, {"n_particles": 4, "n_dims": 3})
    with pytest.raises(ConfigError, match="model.cnf.regularization"):
        load_config("tiny", ["model.cnf.regularization=1"])


def test_rnode_weights_reach_the_cnf():
    model = build_model({"kind": "cnf", "cnf": {"kinetic": 0.5, "hidden": 8}}, (2,), None)
    assert model.regularization == {"kinetic": 0.5, "jacobian": 0.0}


def test_a_kind_is_one_registration():
    try:
        register("realnvp-small", RealNVP, vector)
        assert model_defaults()["realnvp-small"]["hidden"] == _signature_defaults(RealNVP)["hidden"]
        model = build_model({"kind": "realnvp-small", "realnvp-small": {"transforms": 2}}, (3,), 1)
        assert model.log_prob(torch.randn(4, 3), torch.randn(4, 1)).shape == (4,)
        with pytest.raises(ValueError, match="already registered"):
            register("realnvp", RealNVP)
    finally:
        MODEL_KINDS.pop("realnvp-small", None)
