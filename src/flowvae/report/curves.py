"""Learning curves: the rows of a run's ``metrics.csv`` (or ``metrics.jsonl``) and their figure.

flowvae curves RUN                      # RUN/curves.png from RUN/metrics.csv
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowvae.config import ConfigError
from flowvae.plots import save_figure
from flowvae.report.figures import new_figure, upper_limit


def _number(text: str) -> Any:
    """A CSV cell as int, float or None (empty); other text stays a string."""
    if text is None or text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_metrics(source: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.csv or metrics.jsonl, or of a run directory's (metrics.csv first)."""
    path = Path(source)
    if path.is_dir():
        found = [path / n for n in ("metrics.csv", "metrics.jsonl") if (path / n).is_file()]
        if not found:
            raise ConfigError(f"{source} holds no metrics.csv or metrics.jsonl")
        path = found[0]
    if not path.is_file():
        raise ConfigError(f"metrics file {path} does not exist")
    try:
        text = path.read_text()
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as err:
        raise ConfigError(f"cannot read metrics file {path}: {str(err).splitlines()[0]}") from None
    if not all(isinstance(row, dict) for row in rows):
        raise ConfigError(f"metrics file {path} must hold one mapping per row")
    return rows


def column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray | None:
    """``rows[i][key]`` as floats (NaN where missing), or None if no row has the key."""
    if not any(row.get(key) is not None for row in rows):
        return None
    values = [row.get(key) for row in rows]
    return np.array([float(v) if isinstance(v, (int, float)) else math.nan for v in values])


def lr_changes(rows: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """(epoch, new lr) where the logged learning rate changes: row i's lr differs from row i−1's,
    so the new rate was used from the epoch after row i−1's, which is where the line goes."""
    lr = column(rows, "lr")
    if lr is None:
        return []
    epochs = column(rows, "epoch")
    epochs = np.arange(1, len(rows) + 1, dtype=float) if epochs is None else epochs
    return [
        (float(epochs[i - 1]), float(lr[i]))
        for i in range(1, len(rows))
        if np.isfinite(lr[i]) and np.isfinite(lr[i - 1]) and lr[i] != lr[i - 1]
    ]


def plot_curves(
    history: Sequence[Mapping[str, Any]] | str | Path, out_png: str | Path, title: str | None = None
) -> None:
    """Draw learning curves from metrics rows (or a metrics.csv/.jsonl path or run directory) to ``out_png``.

    Top: train loss (the β-weighted −ELBO that was minimised) and valid −ELBO per epoch, with the
    valid reconstruction term −E log p(x|z).  Bottom: the valid KL (every ``valid_kl*`` column) and
    the warm-up β on a second axis.  Dotted vertical lines mark where the learning rate changed.
    """
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(history) if isinstance(history, (str, Path)) else list(history)
    if not rows:
        raise ValueError("no metrics rows to plot")
    epochs = column(rows, "epoch")
    if epochs is None:
        epochs = np.arange(1, len(rows) + 1, dtype=float)
    marker = "o" if len(rows) < 20 else None
    fig = new_figure(7.5, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})

    shown = []
    for key, label, style in (
        ("train_loss", "train loss (β-weighted −ELBO)", "-"),
        ("valid_neg_elbo", "valid −ELBO", "-"),
        ("valid_reconstruction", "valid −log p(x|z)", "--"),
    ):
        values = column(rows, key)
        if values is not None:
            top.plot(epochs, values, style, marker=marker, ms=3, lw=1.2, label=label)
            shown.append(values)
    limit = upper_limit(*shown)
    if limit is not None:
        top.set_ylim(top=limit)
    top.set_ylabel("nats per image")
    top.grid(alpha=0.3)
    if shown:
        top.legend(fontsize=8, loc="upper right")

    kl_keys = [k for k in rows[0] if k.startswith("valid_kl")] or [k for k in rows[-1] if k.startswith("valid_kl")]
    for key in kl_keys:
        bottom.plot(
            epochs, column(rows, key), marker=marker, ms=3, lw=1.2, label="valid KL(q‖p)" if key == "valid_kl" else key
        )
    bottom.set_ylabel("KL (nats)")
    bottom.set_xlabel("epoch")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(alpha=0.3)
    handles, labels = bottom.get_legend_handles_labels()
    beta = column(rows, "beta")
    if beta is not None and np.nanmin(beta) < 1.0:
        twin = bottom.twinx()
        twin.plot(epochs, beta, color="0.45", lw=1.0, ls="-.", label="β (KL weight)")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("β")
        h, lab = twin.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    elif beta is not None:
        labels.append("β = 1 throughout")
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="none"))
    if handles:  # "best" would not see the β axis's line
        bottom.legend(handles, labels, fontsize=8, loc="lower right" if len(handles) > len(kl_keys) else "best")

    changes = lr_changes(rows)
    for x, rate in changes:  # labelled above the axes, out of the curves' way
        for ax in (top, bottom):
            ax.axvline(x, color="0.3", ls=":", lw=1.0)
        top.annotate(
            f"{rate:.2g}",
            (x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(0, 2),
            textcoords="offset points",
            rotation=45,
            va="bottom",
            ha="left",
            fontsize=6.5,
            color="0.3",
        )
    if changes:
        title = f"{title or 'learning curves'}  (dotted: learning rate changed to)"
    top.set_title(title or "learning curves", fontsize=10, pad=22 if changes else 6)
    fig.tight_layout()
    save_figure(fig, out_png)
