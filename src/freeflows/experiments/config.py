"""Experiment configs: defaults, presets, ``--set`` overrides, validation.

A config is a nested dict with the sections ``data``, ``model``, ``optim`` and ``trainer`` plus
``seed`` and ``description``. Every valid key exists in :func:`default_config`; a preset (YAML)
only changes values, and ``--set a.b.c=value`` overrides any single field. Unknown presets, keys
and badly typed values raise :class:`ConfigError` listing the valid choices.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user error in a preset, a YAML file or an override."""


SCHEDULES = ("constant", "cosine", "onecycle")
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def default_config() -> dict[str, Any]:
    """Every config key with its default value (model options for every model kind)."""
    from .registry import model_defaults

    return {
        "description": "",
        "seed": 0,
        "data": {"name": "two-moons", "n_train": 20000, "n_val": 2000, "n_test": 5000, "options": {}},
        "model": {"kind": "fff", **model_defaults()},
        "optim": {
            "lr": 1e-3,
            "weight_decay": 0.0,
            "schedule": "cosine",
            "schedule_steps": None,
            "warmup_steps": 0,
            "grad_clip": 10.0,
        },
        "trainer": {
            "max_steps": 2000,
            "max_epochs": None,
            "batch_size": 512,
            "val_every_epochs": 5,
            "val_batches": 4,
            "val_batch_size": 1000,
            "early_stopping_patience": None,
            "max_nonfinite": 20,
            "accelerator": "cpu",
            "devices": 1,
            "strategy": "auto",
            "num_nodes": 1,
            "progress_bar": True,
            "deterministic": False,
            "plot": True,
            "threads": None,
            "checkpoint_every_steps": 200,
        },
        # draws scored by sample-based metrics: for molecules, EDM's metrics of this many generated
        # molecules and the data row on as many test molecules
        "eval": {"samples": 10_000},
        # model.<kind>.beta: auto adapts beta to hold `metric` at `target` (freeflows.runner.beta)
        "beta_auto": {
            "start": 100.0,
            "target": 0.1,
            "metric": "val/inverse_defect_per_dim",
            "rate": 0.5,
            "min": 0.1,
            "max": 1e4,
            "max_factor": 2.0,
        },
    }


def preset_dir() -> Path:
    """The directory of the shipped preset files ``<name>.yaml`` (``freeflows/presets``)."""
    return Path(str(resources.files("freeflows") / "presets"))


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    out = {}
    for path in sorted(preset_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = str(data.get("description", "")).strip().splitlines()[0] if data else ""
    return out


def merge(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``base`` with the values of ``update``, a nested dict of the same keys, type-checked;
    an unknown key or a value of the wrong type raises :class:`ConfigError`. ``options`` mappings
    are free-form and merged key by key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(map(str, base))}")
        if isinstance(base[key], dict) and key != "options":
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
            out[key] = merge(base[key], value, f"{path}.")
        elif key == "options" and isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = {**out[key], **value}  # free-form: --set data.options.a=1 keeps the others
        else:
            out[key] = _check_type(path, base[key], value)
    return out


def _check_type(path: str, default: Any, value: Any) -> Any:
    if default is None or value is None:
        return value
    if value == "auto" and path.startswith("model.") and path.endswith(".beta"):
        return value  # adapted during training (see the beta_auto section)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    if isinstance(default, (list, dict)) and not isinstance(value, type(default)):
        raise ConfigError(f"{path} must be a {type(default).__name__}, got {value!r}")
    return value


def load_config(
    preset_or_path: str, overrides: list[str] | None = None, data_section: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Resolve a preset name or a YAML path, apply ``key=value`` overrides, and validate.

    ``data_section`` (e.g. ``{"name": "file", "options": {...}}`` for a user's file) replaces the
    preset's ``data.name`` and ``data.options`` before the overrides are applied."""
    path = Path(preset_or_path)
    if path.suffix.lower() in (".npy", ".npz", ".csv"):
        raise ConfigError(
            f"{preset_or_path!r} is a data file, not a config; train on it with "
            f"`freeflows train --data {preset_or_path} [preset]`"
        )
    if preset_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {preset_or_path!r} does not exist")
        text = path.read_text()
    else:
        preset = preset_dir() / f"{preset_or_path}.yaml"
        if not preset.is_file():
            raise ConfigError(
                f"unknown preset {preset_or_path!r}; available presets: {', '.join(list_presets())}"
            )
        text = preset.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {preset_or_path!r} as YAML: {err}".splitlines()[0]) from None
    if data is None:
        raise ConfigError(f"{preset_or_path!r} is empty; a config holds a mapping of config sections")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{preset_or_path!r} must hold a mapping of config sections, not a {type(data).__name__}"
        )
    cfg = merge(default_config(), data)
    if data_section is not None:
        cfg["data"] = {**cfg["data"], "options": {}, **data_section}
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML scalars (``1e-3``, ``true``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        update: dict[str, Any] = {}
        node = update
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        cfg = merge(cfg, update)
    validate(cfg)
    return cfg


#: values of ``trainer.accelerator`` (Lightning's names; ``gpu`` is CUDA or Apple's MPS)
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")


def validate(cfg: dict[str, Any]) -> None:
    """Check values whose valid set is known (model kind, schedule, positive sizes)."""
    from .registry import MODEL_KINDS

    kind = cfg["model"]["kind"]
    if kind not in MODEL_KINDS:
        raise ConfigError(f"unknown model.kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    if cfg["optim"]["schedule"] not in SCHEDULES:
        raise ConfigError(
            f"unknown optim.schedule {cfg['optim']['schedule']!r}; choose one of {', '.join(SCHEDULES)}"
        )
    for section, key in [
        ("trainer", "max_steps"),
        ("trainer", "batch_size"),
        ("trainer", "val_batch_size"),
        ("trainer", "val_every_epochs"),
        ("trainer", "devices"),
        ("trainer", "num_nodes"),
        ("trainer", "checkpoint_every_steps"),
    ]:
        if cfg[section][key] < 1:
            raise ConfigError(f"{section}.{key} must be >= 1, got {cfg[section][key]}")
    epochs = cfg["trainer"]["max_epochs"]
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"trainer.max_epochs must be an integer >= 1 or null, got {epochs!r}")
    if cfg["optim"]["lr"] <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg['optim']['lr']}")
    samples = cfg["eval"]["samples"]
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ConfigError(f"eval.samples must be an integer >= 0, got {samples!r}")
    accelerator = cfg["trainer"]["accelerator"]
    if accelerator not in ACCELERATORS:
        raise ConfigError(
            f"unknown trainer.accelerator {accelerator!r}; choose one of {', '.join(ACCELERATORS)}"
        )
    threads = cfg["trainer"]["threads"]
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"trainer.threads must be an integer >= 1 or null (torch's), got {threads!r}")


def save_config(cfg: dict[str, Any], path: Path) -> None:
    """Write a config as YAML, its keys in order (a run's ``config.yaml``).

    Args:
        cfg: the config.
        path: the file to write.
    """
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
