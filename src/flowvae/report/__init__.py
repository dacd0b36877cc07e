"""Figures and tables of trained runs: learning curves, a comparison of runs, and the posterior seen in 2-D.

    flowvae curves RUN                      # RUN/curves.png from RUN/metrics.csv
    flowvae compare RUN RUN ... --csv t.csv --plot valid.png
    flowvae posterior --run RUN             # 2-D latent: p(z|x) on a grid next to q(z|x)
    flowvae manifold --run RUN              # decoded grid of z (2-D) or latent traversals

One module per figure: :mod:`~flowvae.report.curves`, :mod:`~flowvae.report.compare`,
:mod:`~flowvae.report.posterior` and :mod:`~flowvae.report.manifold`; what they share is in
:mod:`~flowvae.report.figures`, and what they need from a model in :mod:`~flowvae.report.protocol`.
Everything public is importable from here too (``from flowvae import report; report.plot_curves(...)``).
The commands are in :mod:`flowvae.cli.report_commands`.
"""

from __future__ import annotations

from flowvae.grids import Box
from flowvae.report.compare import (
    RESULT_COLUMNS,
    Comparison,
    RunSummary,
    compare_runs,
    flatten,
    plot_comparison,
    summarize_run,
)
from flowvae.report.curves import column, lr_changes, plot_curves, read_metrics
from flowvae.report.figures import CMAP, hide_ticks, new_figure, upper_limit, zero_colour
from flowvae.report.manifold import manifold_images, plot_manifold, prior_quantiles, traversal_images
from flowvae.report.posterior import PosteriorGrid, log_joint, plot_posteriors, posterior_grid, prior_log_prob
from flowvae.report.protocol import DecodesLatents, HasPosterior

__all__ = [
    "Box",
    "CMAP",
    "RESULT_COLUMNS",
    "Comparison",
    "DecodesLatents",
    "HasPosterior",
    "PosteriorGrid",
    "RunSummary",
    "column",
    "compare_runs",
    "flatten",
    "hide_ticks",
    "log_joint",
    "lr_changes",
    "manifold_images",
    "new_figure",
    "plot_comparison",
    "plot_curves",
    "plot_manifold",
    "plot_posteriors",
    "posterior_grid",
    "prior_log_prob",
    "prior_quantiles",
    "read_metrics",
    "summarize_run",
    "traversal_images",
    "upper_limit",
    "zero_colour",
]
