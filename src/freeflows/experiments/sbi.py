r"""Posterior estimation on an sbibm task, scored by C2ST against the reference posteriors.

One call of :func:`run_sbi` (the ``freeflows sbi`` command) does, for a task and a simulation
budget :math:`N`:

1. **train** one amortised posterior :math:`q(\theta \mid x)` on :math:`N` simulations (seeded):

   * ``fff``: a conditional free-form flow trained by the runner from the preset ``sbi-<task>``
     with ``data.n_train = N`` (the run directory gets the runner's checkpoints, metrics and
     plots). The model lives on standardised :math:`(\tilde\theta, \tilde x)`; an observation is
     standardised with the training statistics of :math:`x`, and draws are mapped back with those
     of :math:`\theta` (and, with ``--set data.options.unbounded=true``, through the inverse of
     the prior-support bijection of :func:`freeflows.data.sbi.support_map`);
   * ``npe-nsf``: NPE with sbi's neural spline flow (:mod:`freeflows.eval.baselines`) on exactly the
     same simulations (train and validation splits of the same data set);

2. **sample** ``num_samples`` draws for each requested reference observation (1..10). Draws
   outside the prior's support are rejected and redrawn for both methods (sbi does this for NPE;
   doing the same for fff keeps the comparison fair);

3. **score** each observation's draws against sbibm's reference samples (the first
   ``num_samples`` of its 10,000) by C2ST (:mod:`freeflows.eval.c2st`). ``c2st_classifier`` is
   ``"sklearn"`` (default: sbibm's scikit-learn MLP, comparable with published numbers),
   ``"batched"`` (the same algorithm in torch, all observations and folds trained at once;
   checked against ``"sklearn"``) or ``"torch"`` (a different, early-stopped classifier that is
   *not* sbibm-comparable).

The run directory receives ``sbi_c2st.json``, ``sbi_c2st.md``, ``posterior_obs<k>.npy`` (the draws)
and ``pairplot_obs<k>.png`` (corner plot of draws against the reference).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.sbi import NUM_OBSERVATIONS, TASKS, check_task, get_task, observation, reference_posterior
from ..eval.c2st import C2ST_CLASSIFIERS

METHODS = ("fff", "npe-nsf")
PLOT_CHOICES = ("first", "all", "none")

Sampler = Callable[[int, Tensor, int], Tensor]


def preset_name(task: str) -> str:
    """The preset of the free-form flow for ``task``: ``sbi-<task>``."""
    return f"sbi-{check_task(task)}"


def check_arguments(
    task: str, budget: int, method: str, observations: list[int], num_samples: int, plots: str
) -> None:
    """Raise ``ValueError`` (one line) for anything a user can get wrong."""
    check_task(task)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 20:
        raise ValueError(f"--budget must be an integer >= 20 (simulations), got {budget!r}")
    if not observations:
        raise ValueError("give at least one observation (1..10)")
    for num in observations:
        if not 1 <= num <= NUM_OBSERVATIONS:
            raise ValueError(f"observations must be in 1..{NUM_OBSERVATIONS}, got {num}")
    if len(set(observations)) != len(observations):
        raise ValueError(f"observations must not repeat, got {observations}")
    if not 2 <= num_samples <= 10000:
        raise ValueError(f"--num-samples must be in 2..10000 (the reference has 10000), got {num_samples}")
    if plots not in PLOT_CHOICES:
        raise ValueError(f"--plots must be one of {', '.join(PLOT_CHOICES)}, got {plots!r}")


def default_run_dir(task: str, budget: int, method: str) -> Path:
    """The run directory used when none is given: ``runs/sbi-<task>-<budget>-<method>-<timestamp>``.

    Args:
        task: the sbibm task.
        budget: the simulation budget.
        method: the inference method.
    """
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"sbi-{task}-{budget}-{method}-{stamp}"


# -- training -------------------------------------------------------------------------------------
#: Config keys that change how a trained model is sampled; a run that differs from the requested
#: config only in these can be reused (``reuse=True``), which samples the saved weights. The
#: weights are not always those the requested config would train: ``sample_refine_steps > 0``
#: also makes ``val/nll`` (which picks the best checkpoint) the encoder's density, 0 the
#: decoder's, so reuse keeps the checkpoint chosen under the saved value.
SAMPLING_ONLY_KEYS: tuple[str, ...] = (
    "model.fff.sample_refine_steps",
    "trainer.progress_bar",
    "trainer.plot",
)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def trained_run_differences(run_dir: Path, cfg: dict[str, Any]) -> list[str] | None:
    """``None`` if ``run_dir`` holds no finished training; else the config keys (other than
    :data:`SAMPLING_ONLY_KEYS`, and the ``beta_auto`` section when neither config adapts β) in
    which its saved config differs from ``cfg``."""
    from ..runner.beta import adapts_beta
    from ..runner.train import read_run_config

    if not ((run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()):
        return None
    saved = read_run_config(run_dir)
    a, b = _flat(saved), _flat(cfg)
    ignored = set(SAMPLING_ONLY_KEYS)
    if not any(adapts_beta(c) for c in (saved, cfg)):  # the section has no effect then
        ignored |= {k for k in set(a) | set(b) if k.startswith("beta_auto.")}
    return sorted(k for k in set(a) | set(b) if k not in ignored and a.get(k) != b.get(k))


def train_fff(
    task: str,
    budget: int,
    seed: int,
    run_dir: Path,
    overrides: list[str] | None = None,
    reuse: bool = False,
) -> tuple[Sampler, dict[str, Any]]:
    """Train the preset ``sbi-<task>`` through the runner; return a sampler on the original scale.

    With ``reuse``, a finished run already in ``run_dir`` whose config equals this one apart from
    :data:`SAMPLING_ONLY_KEYS` is loaded instead of trained again (its recorded training time is
    reported); a run with any other difference is an error, never silently reused."""
    from ..runner.train import load_run, train
    from .config import load_config

    cfg = load_config(preset_name(task), [f"data.n_train={budget}", f"seed={seed}", *(overrides or [])])
    if cfg["data"]["name"] != f"sbi:{task}" or cfg["data"]["n_train"] != budget:
        raise ValueError("--set must not change data.name or data.n_train (use --task and --budget)")
    if cfg["seed"] != seed:
        raise ValueError("--set must not change seed (use --seed)")
    differences = trained_run_differences(run_dir, cfg) if reuse else None
    if differences:
        shown = ", ".join(differences[:5]) + (" ..." if len(differences) > 5 else "")
        raise ValueError(
            f"--reuse: the model in {run_dir} was trained with a different config ({shown}); "
            "drop --reuse to train again, or give another --out"
        )
    reused = differences is not None
    start = time.perf_counter()
    if not reused:
        train(cfg, run_dir)
    seconds = time.perf_counter() - start
    _, data, model = load_run(run_dir)
    if cfg["model"]["kind"] == "fff":
        model.sample_refine_steps = cfg["model"]["fff"]["sample_refine_steps"]
    theta_std, x_std = data.meta["theta_standardizer"], data.meta["x_standardizer"]
    support = data.meta.get("theta_support_map")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if reused:  # the time of the original training, as its own sbi run recorded it if it did
        previous = run_dir / "sbi_c2st.json"
        recorded = json.loads(previous.read_text()) if previous.is_file() else metrics
        seconds = float(recorded.get("train_seconds", float("nan")))

    def sample(n: int, x_o: Tensor, draw_seed: int) -> Tensor:
        c = x_std(x_o.reshape(1, -1))[0].reshape(-1)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(draw_seed)
            draws = model.sample(n, c)
        theta = theta_std.inverse(draws.reshape(n, -1))
        return theta if support is None else support.inverse(theta)

    info = {
        "train_seconds": round(seconds, 1),
        "reused_training": reused,
        "steps": metrics.get("steps"),
        "test_nll_standardised": metrics.get("test_nll"),
        "preset": preset_name(task),
        "overrides": list(overrides or []),
        "model": cfg["model"],
        "optim": cfg["optim"],
        "trainer": {
            k: cfg["trainer"][k] for k in ("max_steps", "max_epochs", "batch_size", "early_stopping_patience")
        },
    }
    return sample, info


def train_npe_nsf(
    task: str, budget: int, seed: int, run_dir: Path, **npe_options: Any
) -> tuple[Sampler, dict[str, Any]]:
    """NPE (sbi's NSF, sbibm's settings) on the same simulations as the fff run with this seed."""
    from ..data.sbi import load_sbi_task
    from ..eval.baselines import train_npe_on_dataset

    run_dir.mkdir(parents=True, exist_ok=True)
    data = load_sbi_task(task, budget, seed=seed)
    start = time.perf_counter()
    posterior = train_npe_on_dataset(data, seed=seed, log_dir=run_dir / "npe-tensorboard", **npe_options)
    seconds = time.perf_counter() - start
    info = {"train_seconds": round(seconds, 1), "epochs": posterior.epochs, "npe_options": npe_options}
    return posterior.sample, info


# -- sampling and scoring -------------------------------------------------------------------------
def sample_in_prior_support(
    sample: Sampler, task: str, n: int, x_o: Tensor, seed: int
) -> tuple[Tensor, float]:
    """``n`` draws inside the prior's support (rejecting the rest); also the acceptance rate."""
    prior = get_task(task).get_prior_dist()
    kept: list[Tensor] = []
    total = accepted = 0
    for attempt in range(100):
        draws = sample(n, x_o, seed + 7919 * attempt)
        with torch.no_grad():
            inside = torch.isfinite(prior.log_prob(draws)) & torch.isfinite(draws).all(dim=1)
        total += draws.shape[0]
        accepted += int(inside.sum())
        kept.append(draws[inside])
        if accepted >= n:
            break
    if accepted < n:
        raise RuntimeError(
            f"only {accepted} of {total} posterior draws fell inside the prior's support of {task}"
        )
    return torch.cat(kept)[:n], accepted / total


def pair_plot(samples: Tensor, reference: Tensor, path: Path, title: str, max_points: int = 2000) -> Path:
    """Corner plot: histograms on the diagonal, scatter of pairs below it; draws against reference."""
    from ..plots import _plt

    plt = _plt()
    d = samples.shape[1]
    ref, smp = reference.numpy(), samples.numpy()
    lo = np.minimum(np.quantile(ref, 0.001, axis=0), np.quantile(smp, 0.001, axis=0))
    hi = np.maximum(np.quantile(ref, 0.999, axis=0), np.quantile(smp, 0.999, axis=0))
    pad = 0.05 * (hi - lo + 1e-9)
    lo, hi = lo - pad, hi + pad
    size = min(2.0 * d, 16.0)
    fig, axes = plt.subplots(d, d, figsize=(size, size), squeeze=False)
    m = min(max_points, len(ref), len(smp))
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            if i == j:
                bins = np.linspace(lo[i], hi[i], 50)
                ax.hist(ref[:, i], bins=bins, density=True, alpha=0.5, color="C0", label="reference")
                ax.hist(smp[:, i], bins=bins, density=True, alpha=0.5, color="C1", label="posterior draws")
                ax.set_yticks([])
            else:
                ax.scatter(ref[:m, j], ref[:m, i], s=0.5, alpha=0.3, color="C0", rasterized=True)
                ax.scatter(smp[:m, j], smp[:m, i], s=0.5, alpha=0.3, color="C1", rasterized=True)
                ax.set_ylim(lo[i], hi[i])
            ax.set_xlim(lo[j], hi[j])
            if i < d - 1:
                ax.set_xticklabels([])
            else:
                ax.set_xlabel(f"θ{j + 1}")
            if j > 0:
                ax.set_yticklabels([])
            elif i > 0:
                ax.set_ylabel(f"θ{i + 1}")
    axes[0, 0].legend(loc="upper left", fontsize=7, bbox_to_anchor=(1.05, 1.0) if d > 1 else None)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


#: Classifiers whose scores can be compared with sbibm's published numbers (``"batched"`` runs
#: sbibm's algorithm in torch; tests/test_eval_c2st.py checks it against ``"sklearn"``).
SBIBM_COMPARABLE = ("sklearn", "batched")


def score_observations(
    sample: Sampler,
    task: str,
    observations: list[int],
    num_samples: int,
    seed: int,
    run_dir: Path,
    classifier: str = "sklearn",
    plots: str = "first",
    label: str = "",
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """C2ST of ``num_samples`` draws against the reference, per observation; saves draws and plots.

    With ``classifier="batched"`` all observations are scored at once by
    :func:`freeflows.eval.c2st.c2st_many` (each ``c2st_seconds`` is then the batch's time over the
    number of observations); otherwise one :func:`freeflows.eval.c2st.c2st` call each."""
    from ..eval.c2st import c2st, c2st_many

    rows, pairs = [], []
    for k, num in enumerate(observations):
        x_o = observation(task, num)
        reference = reference_posterior(task, num)[:num_samples]
        draws, acceptance = sample_in_prior_support(sample, task, num_samples, x_o, seed * 1000 + num)
        np.save(run_dir / f"posterior_obs{num}.npy", draws.numpy())
        row: dict[str, Any] = {"observation": num, "prior_acceptance": round(acceptance, 4)}
        if plots == "all" or (plots == "first" and k == 0):
            path = pair_plot(draws, reference, run_dir / f"pairplot_obs{num}.png", f"{label}, obs {num}")
            row["plot"] = path.name
        rows.append(row)
        pairs.append((reference, draws))
    if classifier == "batched":
        start = time.perf_counter()
        scores = c2st_many(pairs, seed=1)
        seconds = [(time.perf_counter() - start) / len(pairs)] * len(pairs)
    else:
        scores, seconds = [], []
        for reference, draws in pairs:
            start = time.perf_counter()
            scores.append(c2st(reference, draws, seed=1, classifier=classifier))  # type: ignore[arg-type]
            seconds.append(time.perf_counter() - start)
    for row, score, secs in zip(rows, scores, seconds, strict=True):
        row["c2st"], row["c2st_seconds"] = round(score, 4), round(secs, 1)
        log(f"  observation {row['observation']}: C2ST {score:.4f} ({row['c2st_seconds']} s)")
    return rows


# -- the whole command ----------------------------------------------------------------------------
def run_sbi(
    task: str,
    budget: int,
    *,
    method: str = "fff",
    observations: list[int] | None = None,
    num_samples: int = 10000,
    seed: int = 0,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    c2st_classifier: str = "sklearn",
    plots: str = "first",
    npe_options: dict[str, Any] | None = None,
    reuse: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, sample and score; write ``sbi_c2st.json``/``.md`` in the run directory; return the result.

    ``reuse`` (fff only) samples a model already trained in ``out`` with the same config, apart
    from sampling options (see :func:`train_fff`)."""
    observations = list(observations or range(1, NUM_OBSERVATIONS + 1))
    check_arguments(task, budget, method, observations, num_samples, plots)
    if c2st_classifier not in C2ST_CLASSIFIERS:
        choices = ", ".join(C2ST_CLASSIFIERS)
        raise ValueError(f"unknown C2ST classifier {c2st_classifier!r}; choose one of: {choices}")
    if method == "npe-nsf" and overrides:
        raise ValueError("--set configures the fff preset; it has no effect with --method npe-nsf")
    if reuse and (method != "fff" or not out):
        raise ValueError("--reuse needs --method fff and the --out directory of the trained run")
    run_dir = Path(out) if out else default_run_dir(task, budget, method)
    classifier = c2st_classifier
    if classifier not in SBIBM_COMPARABLE:
        log(f"note: the {classifier!r} C2ST classifier's scores are NOT comparable with sbibm's")
    doing = "loading (--reuse) or training" if reuse else "training"
    log(f"{doing} {method} on {budget} simulations of {task} (seed {seed}) -> {run_dir}")
    if method == "fff":
        sample, info = train_fff(task, budget, seed, run_dir, overrides, reuse=reuse)
    else:
        sample, info = train_npe_nsf(task, budget, seed, run_dir, **(npe_options or {}))
    done = "reused the model trained" if info.get("reused_training") else "trained"
    log(f"{done} in {info['train_seconds']} s; C2ST ({classifier}) on observations {observations}")
    rows = score_observations(
        sample,
        task,
        observations,
        num_samples,
        seed,
        run_dir,
        classifier=classifier,
        plots=plots,
        label=f"{task}, {method}, budget {budget}, seed {seed}",
        log=log,
    )
    scores = [r["c2st"] for r in rows]
    result = {
        "task": task,
        "budget": budget,
        "method": method,
        "seed": seed,
        "num_samples": num_samples,
        "c2st_classifier": classifier,
        "sbibm_comparable": classifier in SBIBM_COMPARABLE,
        "observations": rows,
        "mean_c2st": round(float(np.mean(scores)), 4),
        "std_c2st": round(float(np.std(scores)), 4),
        "run_dir": str(run_dir),
        "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}",
        **info,
    }
    (run_dir / "sbi_c2st.json").write_text(json.dumps(result, indent=2))
    (run_dir / "sbi_c2st.md").write_text(markdown(result))
    log(f"mean C2ST {result['mean_c2st']:.4f} over {len(rows)} observation(s); wrote {run_dir}/sbi_c2st.md")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The per-observation table of one run."""
    lines = [
        f"# C2ST: {result['method']} on {result['task']}, budget {result['budget']}, seed {result['seed']}",
        "",
        f"{result['num_samples']} posterior draws (inside the prior's support) against the first "
        f"{result['num_samples']} reference samples per observation; C2ST classifier: "
        f"{result['c2st_classifier']}"
        + ("" if result["sbibm_comparable"] else " (NOT comparable with sbibm's numbers)")
        + f"; training took {result['train_seconds']} s. 0.5 is a perfect posterior, 1.0 a useless one.",
        "",
        "| observation | C2ST | C2ST s | prior acceptance |",
        "|---|---|---|---|",
    ]
    for row in result["observations"]:
        cells = (row["observation"], f"{row['c2st']:.4f}", row["c2st_seconds"], row["prior_acceptance"])
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append(f"| **mean** | **{result['mean_c2st']:.4f}** | | |")
    return "\n".join(lines) + "\n"


__all__ = ["METHODS", "TASKS", "markdown", "pair_plot", "preset_name", "run_sbi"]
