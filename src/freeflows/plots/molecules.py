"""Plots of generated molecules against test molecules, saved as PNG: a grid of molecules in 3-D
with their bonds (:func:`plot_molecule_grid`), and histograms of atom-type counts and bond lengths
(:func:`plot_molecule_histograms`). Bonds follow EDM's bond-length rules
(:func:`freeflows.eval.molecules.bond_orders`). matplotlib is imported inside the functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

#: Colour and marker size of each element (index into ``ELEMENTS``: H, C, N, O, F).
ATOM_COLORS = ("#d9d9d9", "#404040", "#3050f8", "#ff0d0d", "#90e050")
ATOM_SIZES = (18, 40, 40, 40, 40)


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, imported lazily
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _draw(ax: object, positions: Tensor, types: Tensor, orders: Tensor) -> None:
    """One molecule: atoms as coloured dots, bonds as lines (thicker for higher orders)."""
    real = types >= 0
    p, t = positions[real].numpy(), types[real].numpy()
    o = orders[real][:, real].numpy()
    for i in range(len(t)):
        for j in range(i + 1, len(t)):
            if o[i, j] > 0:
                seg = p[[i, j]]
                ax.plot(seg[:, 0], seg[:, 1], seg[:, 2], color="#888888", lw=0.8 * o[i, j])
    ax.scatter(p[:, 0], p[:, 1], p[:, 2], c=[ATOM_COLORS[k] for k in t], s=[ATOM_SIZES[k] for k in t],
               edgecolors="k", linewidths=0.3, depthshade=False)
    ax.set_axis_off()
    if len(p):
        centre, half = p.mean(0), max(float(np.abs(p - p.mean(0)).max()), 1.0)
        for setter, k in ((ax.set_xlim, 0), (ax.set_ylim, 1), (ax.set_zlim, 2)):
            setter(centre[k] - half, centre[k] + half)


def plot_molecule_grid(
    generated: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    path: str | Path,
    per_side: int = 4,
) -> Path:
    """Generated molecules (left) next to test molecules (right), ``per_side`` by ``per_side``
    each, in 3-D with bonds.

    Args:
        generated: ``(positions [M, N, 3], types [M, N])`` of generated molecules, ``-1`` padding.
        test: the same for test molecules.
        path: the PNG file.
        per_side: molecules per row and column of each grid.

    Returns:
        ``path``.
    """
    from ..eval.molecules import bond_orders

    plt = _pyplot()
    n = per_side * per_side
    fig = plt.figure(figsize=(2 * 2 * per_side + 0.5, 2 * per_side + 0.6))
    for side, (title, (pos, typ)) in enumerate((("generated", generated), ("test", test))):
        pos, typ = pos[:n].detach().cpu().float(), typ[:n].detach().cpu()
        orders = bond_orders(pos, typ, typ >= 0)
        for k in range(pos.shape[0]):
            row, col = divmod(k, per_side)
            ax = fig.add_subplot(per_side, 2 * per_side, row * 2 * per_side + side * per_side + col + 1,
                                 projection="3d")
            _draw(ax, pos[k], typ[k], orders[k])
        fig.text(0.25 + 0.5 * side, 0.97, title, ha="center", fontsize=12)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_molecule_histograms(
    generated: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    path: str | Path,
    elements: tuple[str, ...] = ("H", "C", "N", "O", "F"),
) -> Path:
    """Atom-type counts per molecule (mean per element) and bond-length histograms (all bonded
    pairs, in ångström) of generated against test molecules.

    Args:
        generated: ``(positions [M, N, 3], types [M, N])`` of generated molecules.
        test: the same for test molecules.
        path: the PNG file.
        elements: the element of each type index.

    Returns:
        ``path``.
    """
    from ..eval.molecules import bond_orders

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.4
    x = np.arange(len(elements))
    for k, (label, (pos, typ)) in enumerate((("generated", generated), ("test", test))):
        pos, typ = pos.detach().cpu().float(), typ.detach().cpu()
        counts = [(typ == e).sum(1).double().mean().item() for e in range(len(elements))]
        left.bar(x + (k - 0.5) * width, counts, width, label=f"{label} ({typ.shape[0]})")
        orders = bond_orders(pos, typ, typ >= 0)
        i, a, b = (orders > 0).nonzero(as_tuple=True)
        keep = a < b
        lengths = (pos[i[keep], a[keep]] - pos[i[keep], b[keep]]).norm(dim=1).numpy()
        right.hist(lengths, bins=60, range=(0.8, 2.0), density=True, histtype="step", label=label)
    left.set_xticks(x, elements)
    left.set_ylabel("atoms per molecule")
    left.legend()
    right.set_xlabel("bond length (Å)")
    right.set_ylabel("density")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
