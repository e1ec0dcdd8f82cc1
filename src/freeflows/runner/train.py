"""Train, resume, load and evaluate runs. A run directory holds::

config.yaml  checkpoints/{best,last}.ckpt  metrics.csv  metrics.json  *.png
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.base import DataSet
from ..experiments.config import ConfigError, save_config
from ..experiments.datasets import build_data
from ..experiments.registry import build_model
from .beta import callback_from_config, model_section
from .callbacks import CheckpointError, DivergenceError, read_checkpoint

RUN_DIR_ENV = "FREEFLOWS_RUN_DIR"


def new_run_dir(name: str, out: str | None) -> Path:
    """``out`` if given, else ``runs/<name>-<timestamp>``; DDP workers reuse their parent's choice."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if out:
        return Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(name).stem}-{stamp}"


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
    # a mid-epoch checkpoint resumes exactly: EpochShuffle skips the batches already used
    warnings.filterwarnings("ignore", message=".*checkpoint that ended before the epoch ended.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")


def build(cfg: dict[str, Any]) -> tuple[DataSet, nn.Module]:
    """Build a config's data set and model: torch is seeded with ``seed`` before the model is built,
    which the data set's ``wrap_model`` wraps if it has one, and the dtypes are checked. A data set
    that scores generated draws gets ``eval.samples`` as ``meta["eval_samples"]``.

    Args:
        cfg: a validated config.

    Returns:
        ``(data, model)``.
    """
    data = build_data(cfg["data"], cfg["seed"])
    if "eval_samples" in data.meta:  # the data set scores generated draws (molecules)
        data.meta["eval_samples"] = cfg["eval"]["samples"]
    torch.manual_seed(cfg["seed"])
    model = build_model(model_section(cfg), data.event_shape, data.condition_dim, meta=data.meta)
    if data.wrap_model is not None:  # e.g. a user's file: the model learns standardised values
        model = data.wrap_model(model)
    check_dtypes(data, model)
    return data, model


def check_dtypes(data: DataSet, model: nn.Module) -> None:
    """Raise a one-line ``ValueError`` when the data's floating dtype is not the model's (for
    example float64 data for a float32 model), instead of a matrix-multiply error mid-training."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return
    (want,) = dtypes
    for what, tensor in (("values", data.train.x), ("conditions", data.train.c)):
        if tensor is not None and tensor.is_floating_point() and tensor.dtype != want:
            raise ValueError(
                f"data set {data.name!r} has {str(tensor.dtype).removeprefix('torch.')} {what} but the "
                f"model is {str(want).removeprefix('torch.')}: convert the data with .to({want})"
            )


def training_steps(trainer_cfg: dict[str, Any], n_train: int) -> int:
    r"""The number of optimiser steps a run takes: ``trainer.max_steps``, or, when
    ``trainer.max_epochs`` is set, that many passes over the ``n_train`` training points,
    capped by ``max_steps``.

    One pass is :math:`\lfloor \lfloor n / W \rfloor / B \rfloor` steps on each of the
    :math:`W` = devices × nodes processes with batch :math:`B` (the loader drops the last partial
    batch), so a training length given in epochs scales with the simulation budget."""
    cap = trainer_cfg["max_steps"]
    epochs = trainer_cfg.get("max_epochs")
    if not epochs:
        return cap
    world = trainer_cfg["devices"] * trainer_cfg["num_nodes"]
    per_epoch = max(1, (n_train // world) // trainer_cfg["batch_size"])
    return min(cap, epochs * per_epoch)


def check_accelerator(accelerator: str) -> None:
    """Fail in one line when ``trainer.accelerator`` names a device that torch cannot see here.

    Args:
        accelerator: ``cpu``, ``gpu``, ``cuda``, ``mps`` or ``auto``.

    Raises:
        ValueError: ``gpu``/``cuda``/``mps`` without such a device.
    """
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    visible = {"gpu": cuda or mps, "cuda": cuda, "mps": mps}.get(accelerator, True)
    if not visible:
        raise ValueError(
            f"trainer.accelerator={accelerator}: torch {torch.__version__} sees no such device here "
            f"(torch.cuda.is_available() is {cuda}); use --accelerator cpu or auto"
        )


def train(
    cfg: dict[str, Any],
    run_dir: Path,
    *,
    resume: bool = False,
    callbacks: list | None = None,
) -> Path | None:
    """Train a model as ``cfg`` says, writing everything to ``run_dir``. Returns ``run_dir`` on
    the main process (``None`` on other DDP ranks)."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from ..eval.metrics import evaluate_model
    from .callbacks import AtomicCheckpointIO, CSVMetricsLogger, RunCheckpoint, TrainingInterrupted
    from .data import SplitDataModule
    from .module import FlowModule
    from .progress import StepProgressBar

    _quiet_lightning()
    tr = cfg["trainer"]
    check_accelerator(tr["accelerator"])
    if tr["threads"] is not None:
        torch.set_num_threads(tr["threads"])
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    resume_step = None
    if resume:
        if not last.is_file():
            raise CheckpointError(f"cannot resume: {last} does not exist")
        resume_step = int(read_checkpoint(last).get("global_step", 0))
    # Everything that can reject the config (data set, model, batch size) runs before the run
    # directory is made, so a bad config leaves no directory behind.
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    data, model = build(cfg)
    beta_callback = callback_from_config(cfg)  # model.<kind>.beta: auto
    steps = training_steps(tr, len(data.train))
    module = FlowModule(model, cfg["optim"], steps, tr["max_nonfinite"], cfg["seed"])
    dm = SplitDataModule(data, tr["batch_size"], tr["val_batch_size"], cfg["seed"])
    is_worker = bool(os.environ.get(RUN_DIR_ENV)) and int(os.environ.get("LOCAL_RANK", "0")) > 0
    if not is_worker:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())  # inherited by DDP worker processes
    checkpoint = RunCheckpoint(last, tr["checkpoint_every_steps"])
    checkpoint.install()
    try:
        cbs = [
            *([StepProgressBar()] if tr["progress_bar"] else []),  # first: it shows the step a stop saves
            ModelCheckpoint(
                ckpt_dir, "best", monitor="val/nll", mode="min", save_top_k=1, enable_version_counter=False
            ),
            checkpoint,
            *([beta_callback] if beta_callback else []),
            *(callbacks or []),
        ]
        if tr["early_stopping_patience"]:
            cbs.append(EarlyStopping("val/nll", patience=tr["early_stopping_patience"], mode="min"))
        trainer = L.Trainer(
            max_steps=steps,
            max_epochs=-1,
            accelerator=tr["accelerator"],
            devices=tr["devices"],
            strategy=tr["strategy"],
            num_nodes=tr["num_nodes"],
            check_val_every_n_epoch=tr["val_every_epochs"],
            limit_val_batches=tr["val_batches"],
            num_sanity_val_steps=0,
            logger=CSVMetricsLogger(run_dir / "metrics.csv", resume_step),
            callbacks=cbs,
            plugins=[AtomicCheckpointIO()],
            enable_progress_bar=tr["progress_bar"],
            enable_model_summary=False,
            use_distributed_sampler=False,
            inference_mode=False,
            log_every_n_steps=max(
                1, min(10, len(data.train) // (tr["batch_size"] * tr["devices"] * tr["num_nodes"]))
            ),
            deterministic=tr["deterministic"],
            default_root_dir=str(run_dir),
        )
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None)
        except DivergenceError as err:  # name where this model's options live
            kind = cfg["model"]["kind"]
            raise DivergenceError(f"{err} (this model's options: --set model.{kind}.<option>=...)") from None
        if checkpoint.signum is not None:  # a signal during the last validation: last.ckpt is final
            raise TrainingInterrupted(checkpoint.signum, int(trainer.global_step))
        if not trainer.is_global_zero:
            return None
    except TrainingInterrupted as err:
        err.run_dir = run_dir
        raise
    finally:
        checkpoint.uninstall()
        os.environ.pop(RUN_DIR_ENV, None)

    best = ckpt_dir / "best.ckpt"
    if best.is_file():
        load_weights(model, best)
    metrics = evaluate_model(model, data)
    metrics["train_seconds"] = module.train_seconds
    metrics["steps"] = int(trainer.global_step)
    metrics["nonfinite_batches_skipped"] = module.nonfinite_total
    metrics["checkpoint"] = "best" if best.is_file() else "last (in memory)"
    write_outputs(run_dir, model, data, metrics, plot=tr["plot"])
    return run_dir


def interrupted_message(run_dir: Path | None) -> str:
    """The one line to show when a run stops on Ctrl-C or SIGTERM: where the run is, and how to
    continue it (or why it cannot be continued)."""
    if run_dir is None:
        return "interrupted"
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        try:
            at = f" at step {int(read_checkpoint(last).get('global_step', 0))}"
        except CheckpointError:
            at = ""
        command = f"freeflows train --resume {shlex.quote(str(run_dir))}"
        return f"interrupted; {run_dir} holds the run{at}: resume with `{command}`"
    if run_dir.is_dir():
        return f"interrupted before the first checkpoint; {run_dir} has nothing to resume: start again"
    return "interrupted before the run directory was made; nothing to resume"


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a run checkpoint's model weights (the ``model.*`` entries of its state dict) into ``model``.

    Args:
        model: the model built from the run's config.
        path: a ``.ckpt`` file written by the runner.

    Raises:
        CheckpointError: the file is missing or unreadable, or its weights do not fit the model.
    """
    ckpt = read_checkpoint(path)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit the model in config.yaml: {first}") from None


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run's saved ``config.yaml``, completed with today's defaults (not validated)."""
    from ..experiments.config import default_config, merge

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml; is it a freeflows run directory?")
    import yaml

    try:
        raw = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"{cfg_path} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_path} does not hold a mapping of config sections (empty or damaged)")
    return merge(default_config(), raw)


def load_run(run_dir: Path) -> tuple[dict[str, Any], DataSet, nn.Module]:
    """Rebuild a run's config, data and model with its best (else last) weights."""
    from ..experiments.config import validate

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    validate(cfg)
    data, model = build(cfg)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        ckpt = run_dir / "checkpoints" / "last.ckpt"
    load_weights(model, ckpt)
    model.eval()
    return cfg, data, model


def write_plots(run_dir: Path, model: nn.Module, data: DataSet) -> list[Path]:
    """The run's plots: for particle data (``data.kind == "particles"``) histograms of the energy
    (``energy.png``) and of inter-particle distances (``distances.png``) of model samples against
    the test split, otherwise the density and sample plots; always the curves."""
    from .. import plots

    if data.kind == "molecules":  # generated molecules (sizes from the training histogram) vs test
        from ..eval.molecule_generation import generate
        from ..plots.molecules import plot_molecule_grid, plot_molecule_histograms

        pos, typ, _, _ = generate(model, data, min(500, len(data.test)), seed=1)
        test = (data.meta["test_positions"], data.meta["test_types"])
        made = [
            plot_molecule_grid((pos, typ), test, run_dir / "molecules.png"),
            plot_molecule_histograms((pos, typ), test, run_dir / "molecule_histograms.png"),
            plots.plot_curves(run_dir / "metrics.csv", run_dir / "curves.png"),
        ]
        return [p for p in made if p is not None]
    with torch.no_grad():
        samples = model.sample(min(5000, len(data.test)), None if data.test.c is None else data.test.c[0])
    if data.kind == "particles":
        from ..plots import particles as plots_particles

        made = []
        if "energy" in data.meta:
            made.append(
                plots_particles.plot_energy_histogram(
                    data.meta["energy"], samples, data.test.x, run_dir / "energy.png"
                )
            )
        made.append(
            plots_particles.plot_distance_histogram(
                samples,
                data.test.x,
                data.meta["n_particles"],
                data.meta["n_dims"],
                run_dir / "distances.png",
            )
        )
    elif data.kind == "image" and data.event_shape[0] == 1:  # grids of test images and draws
        from ..plots.images import plot_image_grids

        panels = {"test images": data.test.x[:64], "model samples": samples[:64]}
        made = [plot_image_grids(panels, run_dir / "samples.png")]
    else:
        made = [
            plots.plot_density(model, data, run_dir / "density.png"),
            plots.plot_samples(samples, data, run_dir / "samples.png"),
        ]
    made.append(plots.plot_curves(run_dir / "metrics.csv", run_dir / "curves.png"))
    return [p for p in made if p is not None]


def write_outputs(
    run_dir: Path, model: nn.Module, data: DataSet, metrics: dict[str, Any], plot: bool = True
) -> None:
    """metrics.json (written atomically) and, if ``plot``, the plots of :func:`write_plots`."""
    if plot:
        metrics["plots"] = [p.name for p in write_plots(run_dir, model, data)]
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, run_dir / "metrics.json")


def evaluate_run(run_dir: Path, plot: bool = True) -> dict[str, Any]:
    """Recompute a run's test metrics (and plots) from its checkpoint. The recomputed keys replace
    those in ``metrics.json``; every other key there (training time, steps, keys written by other
    commands) is kept."""
    from ..eval.metrics import evaluate_model

    _, data, model = load_run(run_dir)
    t = time.perf_counter()
    fresh = evaluate_model(model, data)
    fresh["evaluate_seconds"] = time.perf_counter() - t
    metrics: dict[str, Any] = {}
    old = Path(run_dir) / "metrics.json"
    if old.is_file():
        try:
            prior = json.loads(old.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            prior = None
        if isinstance(prior, dict):
            metrics = prior
    metrics.update(fresh)
    write_outputs(Path(run_dir), model, data, metrics, plot=plot)
    return metrics
