"""Free-form flow, Glow and RealNVP on scikit-learn's 8×8 digits at equal CPU time.

Data: :func:`freeflows.data.digits.load_digits` (1257 train / 180 val / 360 test images,
``split_seed`` 0, uniform dequantisation: fresh noise for every training batch, one fixed draw for
the test split; logit pre-transform with its log-determinant). Every model sits inside the data
set's :class:`~freeflows.data.digits.DequantizedImageModel`, so all densities are of the same
dequantised pixels on [0, 1].

Models (``--models``):

* ``fff``: :class:`~freeflows.FreeFormFlow` with :class:`~freeflows.nets.ConvResNet` encoder and
  decoder and a standard normal latent on ``[1, 8, 8]``;
* ``glow``: :class:`~freeflows.Glow` on ``(1, 8, 8)`` (multi-scale, ``levels`` levels);
* ``realnvp``: :class:`~freeflows.RealNVP` on the 64 flattened pixels (a reshape, volume
  preserving).

Training: :func:`peer_baseline.train_side_by_side`, the same ``time.process_time()`` budget per
model (``--cpu-seconds``), interleaved in turns of ``--slice`` CPU-s, one torch thread, Adam with
a one-cycle schedule in budget progress, the same batches for every model, final weights.

Reported on the test split: bits/dim of the normalised density (``log_prob``; for the free-form
flow the decoder's density, solved ``g(z) = x``, rows whose solve fails are left out and
counted), for the free-form flow also the papers' value (**not normalised**), paired differences
against the free-form flow, the CPU time per sample (``sample(256)``, variants interleaved), and
a PNG of sample grids side by side.

Writes ``<out>/<name>.json`` and ``.md`` and ``--image``.

    python benchmarks/digits.py --cpu-seconds 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from peer_baseline import Contender, Density, TrainSettings, paired_difference, train_side_by_side

ROOT = Path(__file__).resolve().parent
MODELS = ("fff", "glow", "realnvp")
LABELS = {"fff": "free-form flow (conv)", "glow": "Glow (multi-scale)", "realnvp": "RealNVP (flattened)"}


class Flattened(nn.Module):
    """A vector model seen as a model of images: rows are flattened before, and draws reshaped
    after (a volume-preserving reshape, so densities are unchanged)."""

    def __init__(self, model: nn.Module, event_shape: tuple[int, ...]):
        super().__init__()
        self.model = model
        self.event_shape = tuple(event_shape)

    @property
    def latent(self) -> nn.Module:
        return self.model.latent

    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[: x.dim() - len(self.event_shape)], -1)

    def log_prob(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        return self.model.log_prob(self._flat(x), c)

    def sample(self, n: int, c: Tensor | None = None) -> Tensor:
        s = self.model.sample(n, c)
        return s.reshape(*s.shape[:-1], *self.event_shape)

    def sample_and_log_prob(self, n: int, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, log_q = self.model.sample_and_log_prob(n, c)
        return s.reshape(*s.shape[:-1], *self.event_shape), log_q

    def loss(self, x: Tensor, c: Tensor | None = None):
        return self.model.loss(self._flat(x), c)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--cpu-seconds", type=float, default=300.0, help="CPU-time budget per model")
    p.add_argument("--slice", type=float, default=5.0, help="CPU seconds per turn (interleaving)")
    p.add_argument("--seed", type=int, default=0, help="initial weights, batches and probes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grad-clip", type=float, default=10.0)
    p.add_argument("--beta", type=float, default=10.0, help="the free-form flow's reconstruction weight")
    p.add_argument("--hidden", type=int, default=32, help="channels of the conv nets (fff, glow)")
    p.add_argument("--fff-blocks", type=int, default=4)
    p.add_argument("--glow-steps", type=int, default=4)
    p.add_argument("--glow-levels", type=int, default=2)
    p.add_argument("--realnvp-transforms", type=int, default=8)
    p.add_argument("--realnvp-hidden", type=int, default=256)
    p.add_argument("--sample-repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--name", default="digits")
    p.add_argument("--image", type=Path, default=ROOT.parent / "docs" / "img" / "digits-samples.png")
    p.add_argument("--render", type=Path, default=None, metavar="JSON", help="only rewrite the Markdown")
    p.add_argument(
        "--weights", type=Path, default=None, help="save the trained models' weights and training record here"
    )
    p.add_argument("--evaluate-only", action="store_true", help="load --weights instead of training")
    args = p.parse_args(argv)
    if args.cpu_seconds <= 0 or args.slice <= 0 or args.batch_size < 1 or args.sample_repeats < 1:
        p.error("--cpu-seconds, --slice, --batch-size and --sample-repeats must be positive")
    return args


def build_contenders(args: argparse.Namespace, data: Any) -> list[Contender]:
    """The models, each inside the data set's dequantising wrapper, initial weights from the seed."""
    import freeflows as ff
    from freeflows.nets import ConvResNet

    contenders = []
    for kind in args.models:
        torch.manual_seed(args.seed)
        if kind == "fff":

            def net() -> ConvResNet:
                return ConvResNet(1, hidden=args.hidden, blocks=args.fff_blocks)

            inner = ff.FreeFormFlow(net(), net(), ff.StandardNormal(1, 8, 8), beta=args.beta)
            note = f"ConvResNet(1, hidden={args.hidden}, blocks={args.fff_blocks}) x 2, beta={args.beta:g}"
        elif kind == "glow":
            inner = ff.Glow((1, 8, 8), steps=args.glow_steps, levels=args.glow_levels, hidden=args.hidden)
            note = f"Glow((1, 8, 8), steps={args.glow_steps}, levels={args.glow_levels}, "
            note += f"hidden={args.hidden})"
        else:
            flat = ff.RealNVP(64, transforms=args.realnvp_transforms, hidden=args.realnvp_hidden)
            inner = Flattened(flat, (1, 8, 8))
            note = f"RealNVP(64, transforms={args.realnvp_transforms}, hidden={args.realnvp_hidden})"
        model = data.wrap_model(inner)
        densities = {"log_prob": Density(model.log_prob, normalised=True)}
        if kind == "fff":
            densities["paper"] = Density(
                (lambda m: lambda x: m.log_prob(x, variant="paper"))(model), normalised=False,
                note="not normalised",
            )
        contenders.append(
            Contender(LABELS[kind], model, (lambda m: lambda x: m.loss(x).value)(model), densities, note)
        )
    return contenders


def score(log_q: Tensor) -> dict[str, Any]:
    """Bits/dim (mean and standard error over the finite rows) and the count of the others."""
    from freeflows.eval.bits import bits_per_dim

    ok = torch.isfinite(log_q)
    kept = log_q[ok].double()
    nll = float(-kept.mean())
    se = float(kept.std() / math.sqrt(kept.numel()))
    return {
        "nll": nll,
        "nll_stderr": se,
        "bits_per_dim": bits_per_dim(nll, 64, 17),
        "bits_per_dim_stderr": se / (64 * math.log(2)),
        "median_bits_per_dim": bits_per_dim(float(-kept.median()), 64, 17),
        "unsolved": int((~ok).sum()),
        "n": int(log_q.numel()),
    }


def evaluate(contenders: list[Contender], test: Tensor, train: Tensor) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    values: dict[str, Tensor] = {}
    for c in contenders:
        row: dict[str, Any] = {}
        with torch.no_grad(), warnings.catch_warnings():  # the training split's fixed draw: overfitting
            warnings.simplefilter("ignore", RuntimeWarning)
            row["train_log_prob"] = score(torch.cat([c.model.log_prob(x) for x in train.split(120)]))
        for label, density in c.densities.items():
            start = time.process_time()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                log_q = torch.cat([density.fn(x) for x in test.split(120)]).detach()
            seconds = time.process_time() - start
            row[label] = {**score(log_q), "normalised": density.normalised, "cpu_seconds": seconds}
            if label == "log_prob":
                values[c.name] = log_q
        if hasattr(c.model, "diagnostics"):
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                diagnostics = c.model.diagnostics(test)
            if "reconstruction" in diagnostics:
                row["reconstruction"] = float(diagnostics["reconstruction"])
        out[c.name] = row
    ref = contenders[0].name
    for name, log_q in values.items():
        if name != ref:
            diff = paired_difference(values[ref], log_q)  # positive: worse than the reference
            scale = 64 * math.log(2)
            out[name]["vs_first"] = {
                "reference": ref,
                "bits_per_dim": diff["diff"] / scale,
                "stderr": diff["stderr"] / scale,
                "n": diff["n"],
            }
    return out


def sampling_speed(contenders: list[Contender], n: int, repeats: int, seed: int) -> dict[str, Any]:
    """CPU seconds per draw of ``sample(n)``, the models interleaved in shuffled order per repeat,
    and each model's per-repeat ratio to the first model's time (median)."""
    from freeflows.bench.common import interleaved, median, paired_ratio

    fns = {c.name: (lambda m: lambda: m.sample(n))(c.model) for c in contenders}
    with torch.no_grad():
        times = interleaved(fns, repeats, warmup=1, seed=seed)
    ref = contenders[0].name
    return {
        name: {
            "seconds_per_sample": median(t) / n,
            "ratio_to_first": paired_ratio(t, times[ref]),
            "repeats": repeats,
        }
        for name, t in times.items()
    }


def sample_grids(contenders: list[Contender], test: Tensor, path: Path, seed: int) -> None:
    from freeflows.plots.images import plot_image_grids

    panels = {"test images (dequantised)": test[:64]}
    for c in contenders:
        torch.manual_seed(seed)
        with torch.no_grad():
            panels[c.name] = c.model.sample(64)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_image_grids(panels, path)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Free-form flow, Glow and RealNVP on 8×8 digits",
        "",
        f"scikit-learn's digits, {s['n_train']} train / {s['n_val']} val / {s['n_test']} test images "
        f"(split_seed {s['split_seed']}), uniform dequantisation (fresh per training batch; one fixed "
        f"draw for the test split), logit pre-transform. Seed {s['seed']}; "
        f"{s['cpu_seconds']:g} CPU-s per model, interleaved in {s['slice']:g} CPU-s turns, one thread; "
        f"Adam lr {s['lr']:g} (one-cycle), batch {s['batch_size']}, gradient clip {s['grad_clip']:g}; "
        "final weights. Bits/dim = (NLL of x in [0,1]^64 + 64 ln 17) / (64 ln 2).",
        "",
        "| model | params | steps | test bits/dim (normalised) | median over test images | train bits/dim "
        "| unsolved rows | vs free-form flow (bits/dim) | CPU s / sample | sampling time vs free-form flow |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ev, sp = row["test"], row["sampling"]
        lp = ev["log_prob"]
        vs = ev.get("vs_first")
        vs_text = f"{vs['bits_per_dim']:+.3f} ± {vs['stderr']:.3f}" if vs else "—"
        lines.append(
            f"| {row['model']} | {row['n_params']:,} | {row['steps']} | {lp['bits_per_dim']:.3f} ± "
            f"{lp['bits_per_dim_stderr']:.3f} | {lp['median_bits_per_dim']:.3f} | "
            f"{ev['train_log_prob']['bits_per_dim']:.3f} | {lp['unsolved']} of {lp['n']} | {vs_text} | "
            f"{sp['seconds_per_sample']:.2e} | {sp['ratio_to_first']:.2f}× |"
        )
    fff = next((r for r in result["rows"] if "paper" in r["test"]), None)
    if fff is not None:
        paper = fff["test"]["paper"]
        lines += [
            "",
            f"Free-form flow, the papers' value log p_Z(f(x)) − log|det J_g(f(x))| (**not normalised**): "
            f"{paper['bits_per_dim']:.3f} ± {paper['bits_per_dim_stderr']:.3f} bits/dim; test reconstruction "
            f"error ‖x − g(f(x))‖² (pre-transformed units) {fff['test'].get('reconstruction', math.nan):.4f}."
        ]
    lines += [
        "",
        "± is the standard error over the test images; train bits/dim is the same density on the "
        "training split's fixed dequantisation draw (a gap to the test value is overfitting). "
        "\"vs free-form flow\" is the paired mean "
        "difference of the normalised NLL on the same test images (positive: worse than the "
        "free-form flow). Sampling: CPU time of sample(256) per draw, models interleaved, the ratio "
        "the median of per-repeat ratios.",
        "",
        "Models:",
        "",
        *[f"* {row['model']}: {row['note']}" for row in result["rows"]],
        "",
        f"![samples](../../docs/img/{Path(s['image']).name})",
        "",
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        (args.out / f"{args.name}.md").write_text(markdown(result) + "\n")
        return 0
    torch.set_num_threads(1)
    from freeflows.data.digits import load_digits

    data = load_digits()
    contenders = build_contenders(args, data)
    settings = TrainSettings(
        lr=args.lr, batch_size=args.batch_size, grad_clip=args.grad_clip, cpu_seconds=args.cpu_seconds,
        budget="cpu", slice_cpu_seconds=args.slice,
    )
    wall = time.perf_counter()
    if args.evaluate_only:
        saved = torch.load(args.weights, weights_only=False)
        trainees = []
        for c in contenders:
            record = saved[c.name]
            c.model.load_state_dict(record.pop("state_dict"))
            c.model.eval()
            trainees.append(SimpleNamespace(contender=c, **record))
    else:
        trainees = train_side_by_side(contenders, data.train.x, settings, args.seed)
        if args.weights is not None:
            fields = ("steps", "cpu_seconds", "diverged", "nonfinite_total", "last_losses")
            records = {}
            for t in trainees:
                state = t.contender.model.state_dict()
                records[t.contender.name] = {"state_dict": state, **{k: getattr(t, k) for k in fields}}
            torch.save(records, args.weights)
    for t in trainees:
        print(f"trained {t.contender.name}: {t.steps} steps, {t.cpu_seconds:.0f} CPU-s", flush=True)
    test = evaluate(contenders, data.test.x, data.train.x)
    speed = sampling_speed(contenders, 256, args.sample_repeats, args.seed)
    sample_grids(contenders, data.test.x, args.image, args.seed)
    rows = []
    for t in trainees:
        c = t.contender
        rows.append(
            {
                "model": c.name,
                "note": c.note,
                "n_params": sum(p.numel() for p in c.model.parameters()),
                "steps": t.steps,
                "cpu_seconds": t.cpu_seconds,
                "diverged": t.diverged,
                "nonfinite_batches_skipped": t.nonfinite_total,
                "final_train_loss": sum(t.last_losses) / max(1, len(t.last_losses)),
                "test": test[c.name],
                "sampling": speed[c.name],
            }
        )
        print(f"  {c.name}: {json.dumps(test[c.name])}", flush=True)
    result = {
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "render"},
            "split_seed": data.meta["split_seed"],
            "n_train": len(data.train),
            "n_val": len(data.val),
            "n_test": len(data.test),
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        },
        "wall_seconds": time.perf_counter() - wall,
        "command": "python benchmarks/digits.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
