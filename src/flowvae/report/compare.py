"""Several runs side by side: one table of what differs in their configurations and their results,
and their validation curves on one set of axes.

    flowvae compare RUN RUN ... --csv t.csv --plot valid.png
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowvae.config import ConfigError
from flowvae.config_yaml import load_yaml
from flowvae.plots import save_figure
from flowvae.report.curves import column, read_metrics
from flowvae.report.figures import new_figure, upper_limit

# (CSV column, Markdown header, path into results.json, Markdown format)
RESULT_COLUMNS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("train_neg_elbo", "train −ELBO", ("train", "neg_elbo"), ".2f"),
    ("valid_neg_elbo", "valid −ELBO", ("valid", "neg_elbo"), ".2f"),
    ("test_neg_elbo", "test −ELBO", ("test", "neg_elbo"), ".2f"),
    ("test_nll", "test −log p(x)", ("test", "nll"), ".2f"),
    ("nll_samples", "K", ("test", "nll_samples"), "d"),
    ("bits_per_dim", "bits/dim", ("test", "bits_per_dim"), ".3f"),
    ("epochs_trained", "epochs trained", ("epochs_trained",), "d"),  # the config has an "epochs" column too
    ("train_minutes", "train min", ("train_minutes",), ".2f"),
    ("parameters", "parameters", ("parameters",), ",d"),
)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys: {'model': {'latent_dim': 2}} -> {'model.latent_dim': 2}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


@dataclass
class RunSummary:
    """What :func:`summarize_run` reads from a run directory."""

    run: str  # the directory as given
    config: dict[str, Any]  # config.yaml, flattened
    results: dict[str, Any]  # RESULT_COLUMNS' keys -> values (None where absent)
    history: list[dict[str, Any]]  # metrics rows; [] if there are none yet


def summarize_run(run: str | Path) -> RunSummary:
    """Read a run directory's config.yaml, results.json and metrics; one-line errors name the directory."""
    path = Path(run)
    if not path.is_dir():
        raise ConfigError(f"run directory {run} does not exist")
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a flowvae run directory (no config.yaml)")
    config = flatten(load_yaml(path / "config.yaml"))
    raw: dict[str, Any] = {}
    if (path / "results.json").is_file():
        try:
            raw = json.loads((path / "results.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ConfigError(f"{run}: results.json is unreadable: {str(err).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{run}: results.json must hold a mapping")
    has_metrics = any((path / n).is_file() for n in ("metrics.csv", "metrics.jsonl"))
    history = read_metrics(path) if has_metrics else []
    results = {}
    for key, _, where, _ in RESULT_COLUMNS:
        value: Any = raw
        for part in where:
            value = value.get(part) if isinstance(value, Mapping) else None
        results[key] = value
    if results["epochs_trained"] is None and history:  # a run still training: how far it got
        results["epochs_trained"] = history[-1].get("epoch")
    return RunSummary(str(run), config, results, history)


@dataclass
class Comparison:
    """One row per run: the config fields that differ, then the results, then the shared fields."""

    runs: list[RunSummary]
    differing: list[str]  # config keys whose values are not the same in every run
    shared: list[str]  # config keys with one value in every run
    results: list[str]  # RESULT_COLUMNS' keys with a value in at least one run

    @staticmethod
    def _format(value: Any, fmt: str | None) -> str:
        if value is None:
            return ""
        if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = format(int(value) if fmt.endswith("d") else float(value), fmt)
        elif isinstance(value, float) and len(repr(value)) > 10:  # a long float, e.g. 0.30000000000000004
            value = format(value, ".4g")
        return str(value).replace("|", "\\|")

    def markdown(self) -> str:
        """A Markdown table: run, the differing config fields, the results; then a line of the shared fields."""
        formats = {k: (label, fmt) for k, label, _, fmt in RESULT_COLUMNS}
        labels = self.differing + [formats[k][0] for k in self.results]
        lines = ["| run | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for s in self.runs:
            cells = [self._format(s.config.get(k), None) for k in self.differing]
            cells += [self._format(s.results.get(k), formats[k][1]) for k in self.results]
            lines.append(f"| {s.run} | " + " | ".join(cells) + " |")
        if self.shared:
            config = self.runs[0].config
            lines += ["", "same in every run: " + ", ".join(f"{k}={config[k]}" for k in self.shared)]
        return "\n".join(lines)

    def csv(self) -> str:
        """CSV of every column, raw values: run, the differing config, the results, the shared config."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["run", *self.differing, *self.results, *self.shared])
        for s in self.runs:
            writer.writerow(
                [
                    s.run,
                    *(s.config.get(k) for k in self.differing),
                    *(s.results.get(k) for k in self.results),
                    *(s.config.get(k) for k in self.shared),
                ]
            )
        return buffer.getvalue()


def compare_runs(runs: Sequence[str | Path]) -> Comparison:
    """Read the runs and split their config fields into differing and shared (``out`` is the run column)."""
    if not runs:
        raise ValueError("give at least one run directory")
    summaries = [summarize_run(run) for run in runs]
    keys: list[str] = []
    for s in summaries:
        keys += [k for k in s.config if k not in keys and k != "out"]
    missing = object()
    differing = [k for k in keys if len({repr(s.config.get(k, missing)) for s in summaries}) > 1]
    shared = [k for k in keys if k not in differing]
    results = [k for k, _, _, _ in RESULT_COLUMNS if any(s.results[k] is not None for s in summaries)]
    return Comparison(summaries, differing, shared, results)


def plot_comparison(comparison: Comparison, out_png: str | Path, key: str = "valid_neg_elbo") -> None:
    """The runs' ``key`` (valid −ELBO) against epoch on one set of axes, labelled by what differs."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(7.5, 4.5)
    ax = fig.subplots()
    shown = []
    for s in comparison.runs:
        if not s.history:
            raise ConfigError(f"{s.run} holds no metrics.csv or metrics.jsonl")
        values = column(s.history, key)
        if values is None:
            raise ConfigError(f"{s.run}: its metrics have no column {key!r}")
        epochs = column(s.history, "epoch")
        epochs = np.arange(1, len(values) + 1) if epochs is None else epochs
        details = ", ".join(f"{k}={s.config.get(k)}" for k in comparison.differing)
        ax.plot(epochs, values, lw=1.2, label=f"{s.run} ({details})" if details else s.run)
        shown.append(values)
    limit = upper_limit(*shown)
    if limit is not None:
        ax.set_ylim(top=limit)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("valid −ELBO (nats)" if key == "valid_neg_elbo" else key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png)
