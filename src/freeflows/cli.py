"""The ``freeflows`` command: ``train``, ``sample``, ``evaluate``, ``log-prob``, ``presets``, ``sbi``,
``bench``.

A user's mistake (unknown preset, bad ``--set``, missing run directory, corrupt checkpoint, bad
data) ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freeflows", description="Free-form and classic normalizing flows.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a preset or a YAML config")
    t.add_argument("config", nargs="?", help="preset name (see `freeflows presets`) or path to a YAML file")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.fff.beta=100 (repeatable)",
    )
    t.add_argument("--out", help="run directory (default runs/<preset>-<timestamp>)")
    t.add_argument(
        "--data",
        metavar="PATH",
        help="train on your own .npy, .npz or .csv file (with the preset's model; default preset two-moons)",
    )
    t.add_argument(
        "--condition-columns", metavar="A,B", help="with a .csv --data file: the columns that are conditions"
    )
    t.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from checkpoints/last.ckpt (written every "
        "trainer.checkpoint_every_steps steps and on Ctrl-C); it ends where an uninterrupted run would",
    )
    t.add_argument("--seed", type=int, help="shortcut for --set seed=N")
    t.add_argument("--devices", type=int, help="processes/devices (trainer.devices)")
    t.add_argument("--strategy", help="Lightning strategy, e.g. ddp (trainer.strategy)")
    t.add_argument("--num-nodes", type=int, help="number of nodes (trainer.num_nodes)")
    t.add_argument("--accelerator", help="cpu, gpu or auto (trainer.accelerator)")
    t.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads per process, >= 1 (trainer.threads; default: torch's choice, all cores)",
    )

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run_dir")
    s.add_argument("-n", type=int, default=10000, help="number of samples")
    s.add_argument("-o", "--output", default="samples.npy", help="output .npy file")
    s.add_argument("--condition", help="comma-separated condition vector for conditional models")
    s.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("evaluate", help="recompute the test metrics of a trained run")
    e.add_argument("run_dir")
    e.add_argument("--no-plots", action="store_true")

    lp = sub.add_parser("log-prob", help="log-density of every row of a .npy, .npz or .csv file under a run")
    lp.add_argument("run_dir")
    lp.add_argument("file", help="rows to score; conditions from an .npz array c or .csv condition columns")
    lp.add_argument("-o", "--output", default="log_prob.npy", help="output .npy file (one value per row)")
    lp.add_argument("--condition-columns", metavar="A,B", help="condition columns of a .csv file")
    lp.add_argument("--batch-size", type=int, default=1000, help="rows per log_prob call (default 1000)")

    sub.add_parser("presets", help="list the presets")

    b = sub.add_parser(
        "sbi", help="posterior estimation on an sbibm task, scored by C2ST (needs the [sbi] extra)"
    )
    b.add_argument("--task", required=True, help="sbibm task, e.g. two_moons, slcp, gaussian_linear")
    b.add_argument("--budget", type=int, required=True, help="number of simulations to train on")
    b.add_argument("--method", default="fff", help="fff (preset sbi-<task>, default) or npe-nsf (baseline)")
    b.add_argument(
        "--observations",
        default="1..10",
        help="reference observations to score: 1..10 (default), a range 1..3 or a list 1,4,7",
    )
    b.add_argument("--num-samples", type=int, default=10000, help="posterior draws per observation")
    b.add_argument("--seed", type=int, default=0, help="seed of the simulations, training and draws")
    b.add_argument("--out", help="run directory (default runs/sbi-<task>-<budget>-<method>-<timestamp>)")
    b.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the fff preset, e.g. --set trainer.max_steps=500 (repeatable)",
    )
    b.add_argument(
        "--c2st",
        default="sklearn",
        help="C2ST classifier: sklearn (sbibm's, default), batched (sbibm's algorithm in torch, all "
        "observations at once, several times faster) or torch (NOT comparable with sbibm's numbers)",
    )
    b.add_argument("--fast-c2st", action="store_true", help="same as --c2st torch")
    b.add_argument(
        "--reuse",
        action="store_true",
        help="fff: sample the model already trained in --out if its config matches (apart from "
        "sampling options such as model.fff.sample_refine_steps) instead of training again",
    )
    b.add_argument("--plots", default="first", help="pair plots for the first (default), all or none")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")

    from .bench import BENCHMARKS

    k = sub.add_parser("bench", help="speed benchmarks; each writes JSON and a Markdown table")
    k.add_argument(
        "names",
        nargs="+",
        choices=[*BENCHMARKS, "all"],
        metavar="NAME",
        help=f"one or more of {', '.join(BENCHMARKS)}, or all",
    )
    k.add_argument("--out", default="benchmarks/results", help="results directory (default %(default)s)")
    k.add_argument("--quick", action="store_true", help="few repeats and sizes, for a smoke run")
    return p


#: The preset whose model and trainer settings ``train --data PATH`` uses when none is given.
DATA_PRESET = "two-moons"


def _train(args: argparse.Namespace) -> int:
    from .experiments.config import load_config
    from .experiments.datasets import resolve_file_data
    from .runner.train import interrupted_message, new_run_dir, train

    overrides = list(args.overrides)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1 (leave it out for torch's default), got {args.threads}")
        overrides.append(f"trainer.threads={args.threads}")
    for flag, key in (
        ("seed", "seed"),
        ("devices", "trainer.devices"),
        ("strategy", "trainer.strategy"),
        ("num_nodes", "trainer.num_nodes"),
        ("accelerator", "trainer.accelerator"),
    ):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    data_section = None
    if args.config and Path(args.config).suffix.lower() in (".npy", ".npz", ".csv") and not args.data:
        args.config, args.data = None, args.config  # `freeflows train my.npy` means --data my.npy
    if args.data or args.condition_columns:
        if args.resume:
            raise ValueError("--data and --condition-columns do not go with --resume: the run keeps its data")
        if not args.data:
            raise ValueError("--condition-columns needs --data PATH (a .csv file)")
        options = {"path": args.data, "condition_columns": args.condition_columns}
        data_section = {"name": "file", "options": options}
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"cannot resume: {run_dir} is not a run directory (no config.yaml)")
        cfg = load_config(str(run_dir / "config.yaml"), overrides)
    else:
        if not args.config and not args.data:
            raise ValueError(
                "give a preset or YAML config to train (see `freeflows presets`), --data PATH, "
                "or --resume RUN_DIR"
            )
        cfg = resolve_file_data(load_config(args.config or DATA_PRESET, overrides, data_section))
        run_dir = new_run_dir(args.data or args.config, args.out)
    try:
        out = train(cfg, run_dir, resume=bool(args.resume))
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (building data, final evaluation)
        print(f"freeflows: {interrupted_message(run_dir)}", file=sys.stderr)
        return 130
    if out is None:  # a DDP worker process
        return 0
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"\nrun directory: {out}")
    for key in ("test_nll", "kl_to_truth", "test_reconstruction", "train_seconds", "n_params"):
        if key in metrics:
            print(
                f"  {key}: {metrics[key]:.4g}"
                if isinstance(metrics[key], float)
                else f"  {key}: {metrics[key]}"
            )
    files = ["config.yaml", "checkpoints/", "metrics.json", "metrics.csv", *metrics.get("plots", [])]
    print(f"  files: {', '.join(files)}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .runner.train import load_run

    if args.n < 1:
        raise ValueError(f"-n must be a positive integer, got {args.n}")
    _, data, model = load_run(Path(args.run_dir))
    c = None
    if args.condition is not None:
        try:
            c = torch.tensor([float(v) for v in args.condition.split(",")])
        except ValueError:
            raise ValueError(f"--condition must be comma-separated numbers, got {args.condition!r}") from None
    elif data.condition_dim is not None:
        raise ValueError(f"this model is conditional: pass --condition with {data.condition_dim} numbers")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        samples = model.sample(args.n, c)
    out = Path(args.output)
    np.save(out, samples.numpy())
    print(f"wrote {args.n} samples of shape {tuple(samples.shape[1:])} to {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .runner.train import evaluate_run

    metrics = evaluate_run(Path(args.run_dir), plot=not args.no_plots)
    print(json.dumps(metrics, indent=2))
    return 0


def _log_prob(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .data.base import Split
    from .data.user import read_rows_for
    from .eval.metrics import batched_log_prob
    from .runner.train import load_run

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    _, data, model = load_run(Path(args.run_dir))
    x, c = read_rows_for(data, args.file, args.condition_columns)
    log_q = batched_log_prob(model, Split(x, c), args.batch_size)
    out = Path(args.output)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")  # where np.save writes
    try:
        np.save(out, log_q.numpy())
    except OSError as err:
        raise ValueError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"wrote the log-density (nats, in the file's units) of {len(log_q)} rows of {args.file} to {out}")
    n_nan = int(torch.isnan(log_q).sum())
    if n_nan:
        print(
            f"freeflows: warning: {n_nan} of {len(log_q)} rows have no log-density (NaN in {out}): the "
            "model could not compute it there (a free-form flow's density solve did not converge)",
            file=sys.stderr,
        )
    return 0


def _presets(args: argparse.Namespace) -> int:
    from .experiments.config import list_presets

    presets = list_presets()
    width = max(map(len, presets), default=0)
    for name, description in presets.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _observation_list(text: str) -> list[int]:
    """``"1..10"``, ``"3"`` or ``"1,4,7"`` -> a list of observation numbers."""
    try:
        if ".." in text:
            first, last = (int(v) for v in text.split("..", 1))
            return list(range(first, last + 1))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--observations must look like 1..10, 3 or 1,4,7; got {text!r}") from None


def _sbi(args: argparse.Namespace) -> int:
    import torch

    from .experiments.sbi import run_sbi

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.method == "fff":
        overrides.append(f"trainer.threads={args.threads}")
    run_sbi(
        args.task,
        args.budget,
        method=args.method,
        observations=_observation_list(args.observations),
        num_samples=args.num_samples,
        seed=args.seed,
        out=args.out,
        overrides=overrides,
        c2st_classifier="torch" if args.fast_c2st else args.c2st,
        plots=args.plots,
        reuse=args.reuse,
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    from .bench import BENCHMARKS

    names = BENCHMARKS if "all" in args.names else tuple(dict.fromkeys(args.names))
    for name in names:
        print(f"== {name} ==", flush=True)
        result = importlib.import_module(f".bench.{name}", __package__).run(args.out, quick=args.quick)
        print(result.get("markdown", ""))
        print(f"wrote {Path(args.out) / name}.json and .md", flush=True)
    return 0


#: top-level modules of the optional extras, and the extra that installs each
EXTRA_OF_MODULE = {
    **dict.fromkeys(("lightning", "matplotlib", "yaml", "tqdm", "torchdiffeq"), "tool"),
    **dict.fromkeys(("sbibm", "sbi", "sklearn", "scipy", "elfi", "future", "pyro"), "sbi"),
}


def _missing_extra(err: ImportError) -> int:
    """One line naming the extra to install for a missing module (exit 2), also when the
    ``ModuleNotFoundError`` is the cause of another ``ImportError``; re-raise any other error."""
    missing = err if isinstance(err, ModuleNotFoundError) else err.__cause__
    module = (getattr(missing, "name", None) or "").split(".")[0]
    if not isinstance(missing, ModuleNotFoundError) or module not in EXTRA_OF_MODULE:
        raise err
    extra = EXTRA_OF_MODULE[module]
    print(
        f'freeflows: error: this command needs the [{extra}] extra (module {module!r} is missing): '
        f'pip install "freeflows[{extra}]"',
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the ``freeflows`` command and turn its failures into one line on stderr.

    Args:
        argv: the arguments after ``freeflows``; ``None``: ``sys.argv[1:]``.

    Returns:
        The exit status: the command's own, 1 when training diverges or a solve fails, 2 for a user's
        mistake or a missing extra, ``128 + signum`` when a signal stops training, 130 on Ctrl-C
        otherwise.
    """
    args = _parser().parse_args(argv)
    try:
        from .contract import NumericalError
        from .runner.callbacks import CheckpointError, DivergenceError, TrainingInterrupted
        from .runner.train import interrupted_message
    except ModuleNotFoundError as err:
        return _missing_extra(err)

    handlers = {
        "train": _train,
        "sample": _sample,
        "evaluate": _evaluate,
        "log-prob": _log_prob,
        "presets": _presets,
        "sbi": _sbi,
        "bench": _bench,
    }
    try:
        return handlers[args.command](args)
    except TrainingInterrupted as err:  # SIGINT/SIGTERM: last.ckpt was written on the way out
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
            print(f"freeflows: {interrupted_message(err.run_dir)}", file=sys.stderr)  # once, not per rank
        return err.exit_status
    except ImportError as err:
        return _missing_extra(err)
    except (DivergenceError, NumericalError) as err:
        print(f"freeflows: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"freeflows: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("freeflows: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
