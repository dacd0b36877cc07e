"""Pictures of 2-D targets and fitted flows, in the layout of Rezende & Mohamed (2015), Fig. 3.

The target is drawn as exp(−U) on a grid.  q is drawn as a 2-D histogram of samples: planar and
IAF stacks have no one-pass inverse, so the histogram is the one method that works for every flow
(and what reimplementations of the figure do).  Each panel is scaled to its own maximum.

matplotlib is imported inside the functions and figures are drawn on an explicit Agg canvas, so
importing this module neither imports matplotlib nor touches pyplot's global backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from flowvae.flows.base import Flow
from flowvae.grids import grid_points
from flowvae.toy.energies import Box, Target
from flowvae.toy.fit import sample

CMAP = "viridis"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def target_image(target: Target, size: int = 300) -> np.ndarray:
    """exp(−U) / max on a ``size``² grid over the target's box, indexed [z2, z1] (row 0 at z2 min)."""
    grid, _ = grid_points(target.box, size)
    with torch.no_grad():
        log_p = -target.energy(grid)
    return torch.exp(log_p - log_p.max()).numpy()


def sample_image(z: torch.Tensor | np.ndarray, box: Box, bins: int = 150) -> np.ndarray:
    """Normalized 2-D histogram of samples z (n, 2) over ``box``, indexed [z2, z1]."""
    z = z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else np.asarray(z)
    x0, x1, y0, y1 = box
    counts, _, _ = np.histogram2d(z[:, 1], z[:, 0], bins=bins, range=[[y0, y1], [x0, x1]])
    peak = counts.max()
    return counts / peak if peak > 0 else counts


def flow_samples(flow: Flow | None, n: int = 200_000, seed: int = 0) -> torch.Tensor:
    """n samples of q = flow_*N(0, I) in the flow's dtype, without gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return sample(flow, n, generator)[0]


def _show(ax: Any, image: np.ndarray, box: Box, title: str | None = None) -> None:
    ax.imshow(image, origin="lower", extent=box, cmap=CMAP, aspect="equal", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def plot_fit(
    target: Target,
    samples: torch.Tensor | np.ndarray,
    history: Mapping[str, Sequence[float]] | None = None,
    title: str = "q",
) -> Any:
    """One fit: true density, histogram of q's samples, and the ELBO curve if a history is given."""
    panels = 3 if history else 2
    fig = _figure(3.2 * panels, 3.4)
    axes = fig.subplots(1, panels)
    _show(axes[0], target_image(target), target.box, f"{target.name}: exp(−U)")
    _show(axes[1], sample_image(samples, target.box), target.box, title)
    if history:
        ax = axes[2]
        ax.plot(history["step"], history["elbo"], lw=1)
        if target.log_z is not None:
            ax.axhline(target.log_z, color="k", ls="--", lw=0.8, label="log Z")
            ax.legend(fontsize=8)
        ax.set_xlabel("update")
        ax.set_ylabel("ELBO (β = 1)")
        low = np.nanpercentile(history["elbo"], 10) if len(history["elbo"]) else None
        if low is not None and np.isfinite(low):
            ax.set_ylim(bottom=low - 0.5)
        ax.set_title("training", fontsize=9)
    fig.tight_layout()
    return fig


def plot_grid(targets: Sequence[Target], columns: Sequence[str], images: Mapping[tuple[str, str], np.ndarray]) -> Any:
    """Rows = targets; first column exp(−U), then one column per label in ``columns``.

    ``images[(target.name, label)]`` is a histogram from :func:`sample_image`; missing ones stay blank.
    """
    rows, cols = len(targets), 1 + len(columns)
    fig = _figure(1.45 * cols, 1.45 * rows + 0.35)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for i, target in enumerate(targets):
        _show(axes[i, 0], target_image(target), target.box, "exp(−U)" if i == 0 else None)
        axes[i, 0].set_ylabel(target.name, fontsize=10)
        for j, label in enumerate(columns, start=1):
            image = images.get((target.name, label))
            if image is None:
                axes[i, j].set_axis_off()
            else:
                _show(axes[i, j], image, target.box, label if i == 0 else None)
    fig.subplots_adjust(
        left=0.03, right=0.995, bottom=0.01, top=1.0 - 0.3 / (1.45 * rows + 0.35), wspace=0.05, hspace=0.05
    )
    return fig
