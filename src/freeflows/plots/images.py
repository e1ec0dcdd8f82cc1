"""Grids of images side by side (tool layer): data and model samples of an image data set."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .density import _plt


def tile(images: torch.Tensor, columns: int, pad: int = 1) -> np.ndarray:
    """``images`` ``[N, 1, H, W]`` (or ``[N, H, W]``) tiled row by row into one grey array with
    ``pad`` pixels of background (NaN) between them; values are clipped to [0, 1].

    Args:
        images: the images.
        columns: images per row.
        pad: pixels between images.

    Returns:
        ``[rows * (H + pad) - pad, columns * (W + pad) - pad]``.
    """
    x = images.detach().float().cpu()
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"tile draws one-channel images, got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.dim() != 3 or x.shape[0] == 0:
        raise ValueError(f"tile needs images [N, 1, H, W] or [N, H, W], got shape {tuple(images.shape)}")
    n, h, w = x.shape
    rows = math.ceil(n / columns)
    out = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad), np.nan)
    for k in range(n):
        r, c = divmod(k, columns)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = x[k].clamp(0, 1).numpy()
    return out


def plot_image_grids(panels: dict[str, torch.Tensor], path: Path, columns: int = 8) -> Path:
    """One grid per entry of ``panels`` (title -> images ``[N, 1, H, W]`` in [0, 1], white = 1),
    side by side in one PNG.

    Args:
        panels: title -> images.
        path: where to write the PNG.
        columns: images per row of each grid.

    Returns:
        ``path``.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9), squeeze=False)
    cmap = plt.get_cmap("gray").copy()
    cmap.set_bad("#d0d8e0")
    for ax, (title, images) in zip(axes[0], panels.items(), strict=True):
        ax.imshow(tile(images, columns), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
