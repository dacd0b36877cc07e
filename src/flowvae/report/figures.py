"""What every figure of :mod:`flowvae.report` shares: a figure on its own Agg canvas, the colour
map, and a y-limit that lets later epochs' differences show.

matplotlib is imported inside the functions, so importing the report code does not load it, and
no figure touches pyplot's global state (as in :mod:`flowvae.toy.plots`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

CMAP = "viridis"


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` of ``width`` × ``height`` inches drawn on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def upper_limit(*series: np.ndarray | None) -> float | None:
    """A y-limit that leaves out the first epochs' large losses, so later differences show."""
    tails = [s[len(s) // 10 + 1 :] for s in series if s is not None and len(s) > 4]
    values = np.concatenate(tails) if tails else np.array([])
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = values.min(), values.max()
    return high + 0.1 * max(high - low, 1e-3)


def zero_colour() -> Any:
    """The colour of 0 in :data:`CMAP`, for the parts of a density panel that nothing covers."""
    from matplotlib import colormaps

    return colormaps[CMAP](0.0)


def hide_ticks(ax: Any) -> None:
    """No ticks on either axis of ``ax`` (a panel that shows an image)."""
    ax.set_xticks([])
    ax.set_yticks([])
