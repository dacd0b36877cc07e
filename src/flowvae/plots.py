"""Image grids for samples and reconstructions."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from flowvae.io import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images (N, C, H, W) with values in [0, 1] into one (rows·(H+pad), cols·(W+pad)[, 3]) array."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    return array[..., 0] if c == 1 else array


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, min_width: int = 480) -> None:
    """Save an image grid as PNG (atomically), enlarged by whole pixels to at least ``min_width``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = image_grid(images, nrow)
    scale = max(1, math.ceil(min_width / grid.shape[1]))
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    buffer = io.BytesIO()
    plt.imsave(buffer, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0.0, vmax=1.0, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> None:
    """Render a matplotlib figure to PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
