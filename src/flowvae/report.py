"""Figures and tables of trained runs: learning curves, a comparison of runs, and the posterior seen in 2-D.

    flowvae curves RUN                      # RUN/curves.png from RUN/metrics.csv
    flowvae compare RUN RUN ... --csv t.csv --plot valid.png
    flowvae posterior --run RUN             # 2-D latent: p(z|x) on a grid next to q(z|x)
    flowvae manifold --run RUN              # decoded grid of z (2-D) or latent traversals

The true posterior of a 2-D model is p(z|x) = p(x|z) p(z) / p(x) with log p(x) by the midpoint
rule on a grid (log-sum-exp).  q(z|x) is drawn exactly, not from samples: a grid of z₀ is pushed
through the flow, z_K = flow(z₀, h), and log q(z_K) = log N(z₀; μ, σ²) − log|det ∂z_K/∂z₀| is
drawn on that warped mesh, so flows without an inverse (planar, Sylvester) need none.

matplotlib is imported inside the functions and figures are drawn on an explicit Agg canvas, as
in :mod:`flowvae.toy.plots`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowvae.config import ConfigError, load_yaml
from flowvae.distributions import standard_normal_log_prob
from flowvae.plots import image_grid, save_figure
from flowvae.toy.metrics import grid_points

Box = tuple[float, float, float, float]  # (z1 min, z1 max, z2 min, z2 max)
CMAP = "viridis"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


# ----------------------------------------------------------------------------------------------
# Learning curves


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


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray | None:
    """rows[i][key] as floats (NaN where missing), or None if no row has the key."""
    if not any(row.get(key) is not None for row in rows):
        return None
    values = [row.get(key) for row in rows]
    return np.array([float(v) if isinstance(v, (int, float)) else math.nan for v in values])


def _upper_limit(*series: np.ndarray) -> float | None:
    """A y-limit that leaves out the first epochs' large losses, so later differences show."""
    tails = [s[len(s) // 10 + 1:] for s in series if s is not None and len(s) > 4]
    values = np.concatenate(tails) if tails else np.array([])
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = values.min(), values.max()
    return high + 0.1 * max(high - low, 1e-3)


def lr_changes(rows: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """(epoch, new lr) where the logged learning rate changes: row i's lr differs from row i−1's,
    so the new rate was used from the epoch after row i−1's, which is where the line goes."""
    lr = _column(rows, "lr")
    if lr is None:
        return []
    epochs = _column(rows, "epoch")
    epochs = np.arange(1, len(rows) + 1, dtype=float) if epochs is None else epochs
    return [(float(epochs[i - 1]), float(lr[i])) for i in range(1, len(rows))
            if np.isfinite(lr[i]) and np.isfinite(lr[i - 1]) and lr[i] != lr[i - 1]]


def plot_curves(history: Sequence[Mapping[str, Any]] | str | Path, out_png: str | Path,
                title: str | None = None) -> None:
    """Draw learning curves from metrics rows (or a metrics.csv/.jsonl path or run directory) to ``out_png``.

    Top: train loss (the β-weighted −ELBO that was minimised) and valid −ELBO per epoch, with the
    valid reconstruction term −E log p(x|z).  Bottom: the valid KL (every ``valid_kl*`` column) and
    the warm-up β on a second axis.  Dotted vertical lines mark where the learning rate changed.
    """
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(history) if isinstance(history, (str, Path)) else list(history)
    if not rows:
        raise ValueError("no metrics rows to plot")
    epochs = _column(rows, "epoch")
    if epochs is None:
        epochs = np.arange(1, len(rows) + 1, dtype=float)
    marker = "o" if len(rows) < 20 else None
    fig = _figure(7.5, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})

    shown = []
    for key, label, style in (("train_loss", "train loss (β-weighted −ELBO)", "-"),
                              ("valid_neg_elbo", "valid −ELBO", "-"),
                              ("valid_reconstruction", "valid −log p(x|z)", "--")):
        values = _column(rows, key)
        if values is not None:
            top.plot(epochs, values, style, marker=marker, ms=3, lw=1.2, label=label)
            shown.append(values)
    limit = _upper_limit(*shown)
    if limit is not None:
        top.set_ylim(top=limit)
    top.set_ylabel("nats per image")
    top.grid(alpha=0.3)
    if shown:
        top.legend(fontsize=8, loc="upper right")

    kl_keys = [k for k in rows[0] if k.startswith("valid_kl")] or [k for k in rows[-1] if k.startswith("valid_kl")]
    for key in kl_keys:
        bottom.plot(epochs, _column(rows, key), marker=marker, ms=3, lw=1.2,
                    label="valid KL(q‖p)" if key == "valid_kl" else key)
    bottom.set_ylabel("KL (nats)")
    bottom.set_xlabel("epoch")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(alpha=0.3)
    handles, labels = bottom.get_legend_handles_labels()
    beta = _column(rows, "beta")
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
        top.annotate(f"{rate:.2g}", (x, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 2),
                     textcoords="offset points", rotation=45, va="bottom", ha="left", fontsize=6.5, color="0.3")
    if changes:
        title = f"{title or 'learning curves'}  (dotted: learning rate changed to)"
    top.set_title(title or "learning curves", fontsize=10, pad=22 if changes else 6)
    fig.tight_layout()
    save_figure(fig, out_png)


# ----------------------------------------------------------------------------------------------
# Comparing runs

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

    run: str                       # the directory as given
    config: dict[str, Any]         # config.yaml, flattened
    results: dict[str, Any]        # RESULT_COLUMNS' keys -> values (None where absent)
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
    differing: list[str]   # config keys whose values are not the same in every run
    shared: list[str]      # config keys with one value in every run
    results: list[str]     # RESULT_COLUMNS' keys with a value in at least one run

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
            writer.writerow([s.run, *(s.config.get(k) for k in self.differing),
                             *(s.results.get(k) for k in self.results), *(s.config.get(k) for k in self.shared)])
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

    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    shown = []
    for s in comparison.runs:
        if not s.history:
            raise ConfigError(f"{s.run} holds no metrics.csv or metrics.jsonl")
        values = _column(s.history, key)
        if values is None:
            raise ConfigError(f"{s.run}: its metrics have no column {key!r}")
        epochs = _column(s.history, "epoch")
        epochs = np.arange(1, len(values) + 1) if epochs is None else epochs
        details = ", ".join(f"{k}={s.config.get(k)}" for k in comparison.differing)
        ax.plot(epochs, values, lw=1.2, label=f"{s.run} ({details})" if details else s.run)
        shown.append(values)
    limit = _upper_limit(*shown)
    if limit is not None:
        ax.set_ylim(top=limit)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("valid −ELBO (nats)" if key == "valid_neg_elbo" else key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png)


# ----------------------------------------------------------------------------------------------
# The posterior of a 2-D latent, seen on a grid


def prior_log_prob(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """log p(z) of a model: ``model.prior.log_prob`` if it has a prior with one, else N(0, I)."""
    prior = getattr(model, "prior", None)
    if prior is not None and callable(getattr(prior, "log_prob", None)):
        return prior.log_prob
    return standard_normal_log_prob


@torch.no_grad()
def log_joint(model: torch.nn.Module, x: torch.Tensor, z: torch.Tensor,
              log_prior: Callable[[torch.Tensor], torch.Tensor] | None = None, chunk: int | None = None
              ) -> torch.Tensor:
    """log p(x, z) = log p(x|z) + log p(z) for one image x (C, H, W) at points z (N, D); float64 (N,).

    z is decoded ``chunk`` points at a time; by default as many as the evaluation's memory budget allows.
    """
    from flowvae.evaluation import MAX_ROWS, auto_chunk_size
    from flowvae.models import VAE

    log_prior = log_prior or prior_log_prob(model)
    chunk = chunk or (auto_chunk_size(model, 1, MAX_ROWS)[1] if isinstance(model, VAE) else 4096)
    ref = next(model.parameters())
    target = model.likelihood.prepare(x.to(ref.device)[None])
    out = []
    for part in z.split(chunk):
        part = part.to(ref.device, ref.dtype)
        log_px_z = model.likelihood.log_prob(model.decode(part), target)
        out.append(log_px_z.double() + log_prior(part).double())
    return torch.cat(out)


@dataclass
class PosteriorGrid:
    """The true posterior of one image on a grid and q(z|x) on its warped mesh (CPU, float64)."""

    z1: torch.Tensor             # (G,) cell centres along z1
    z2: torch.Tensor             # (G,) cell centres along z2
    log_posterior: torch.Tensor  # (G, G) normalised log p(z|x), indexed [z2, z1]
    log_px: float                # log p(x) by quadrature
    q_points: torch.Tensor       # (G, G, 2) z_K = flow(z₀) of a z₀ grid, indexed [z₀2, z₀1]
    log_q: torch.Tensor          # (G, G) log q(z_K|x) at q_points
    kl: float                    # KL(q ‖ p(z|x)), Monte Carlo over q's samples
    kl_stderr: float             # its standard error
    samples: int                 # the Monte Carlo sample size

    @property
    def box(self) -> Box:
        h1, h2 = (self.z1[1] - self.z1[0]).item() / 2, (self.z2[1] - self.z2[0]).item() / 2
        return (self.z1[0].item() - h1, self.z1[-1].item() + h1, self.z2[0].item() - h2, self.z2[-1].item() + h2)


def _union(a: Box, b: Box) -> Box:
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def _pad(box: Box, fraction: float) -> Box:
    w, h = max(box[1] - box[0], 1e-6), max(box[3] - box[2], 1e-6)
    return (box[0] - fraction * w, box[1] + fraction * w, box[2] - fraction * h, box[3] + fraction * h)


def _mass_boxes(model: torch.nn.Module, x: torch.Tensor, start: Box, log_prior: Callable,
                drops: Sequence[float] = (20.0, 9.0), size: int = 128, tries: int = 6) -> list[Box]:
    """For each drop, the box around the cells of a coarse grid where log p(x, z) is within ``drop``
    nats of its maximum.  The grid starts on ``start`` and is widened on each side that the cells
    within the largest drop touch."""
    box = start
    for attempt in range(tries):
        grid, _ = grid_points(box, size)
        lj = log_joint(model, x, grid.reshape(-1, 2), log_prior).reshape(size, size)
        keep = lj >= lj.max() - max(drops)
        edges = (keep[:, 0].any(), keep[:, -1].any(), keep[0, :].any(), keep[-1, :].any())  # z1 lo/hi, z2 lo/hi
        if not any(edges) or attempt == tries - 1:
            break
        w, h = box[1] - box[0], box[3] - box[2]
        box = (box[0] - w * edges[0], box[1] + w * edges[1], box[2] - h * edges[2], box[3] + h * edges[3])
    h1, h2 = (box[1] - box[0]) / size, (box[3] - box[2]) / size
    boxes = []
    for drop in drops:
        keep = lj >= lj.max() - drop
        z1, z2 = grid[..., 0][keep], grid[..., 1][keep]
        boxes.append((z1.min().item() - 1.5 * h1, z1.max().item() + 1.5 * h1, z2.min().item() - 1.5 * h2,
                      z2.max().item() + 1.5 * h2))
    return boxes


@torch.no_grad()
def posterior_grid(model: torch.nn.Module, x: torch.Tensor, grid: int = 200, samples: int = 2000,
                   box: Box | None = None, log_prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   seed: int = 0) -> list[PosteriorGrid]:
    """The true posterior p(z|x) on a grid and the exact q(z|x) on a warped mesh, for images x (B, C, H, W).

    log p(x) = log Σ_cells p(x, z) ΔA (midpoint rule) over a box that holds the posterior's mass
    (found on a coarse grid: log p(x, z) within 20 nats of its maximum), and
    KL(q ‖ p(z|x)) = E_q[log q(z) − log p(x, z)] + log p(x) by Monte Carlo over ``samples`` draws.
    The grid returned (and drawn) covers where log p(x, z) is within 9 nats of its maximum and
    99.8% of q's samples; ``box`` fixes both grids instead.
    ``model`` needs ``latent_dim == 2``, ``posterior``, ``decode`` and ``likelihood``.
    """
    if model.latent_dim != 2:
        raise ValueError(f"the posterior can be drawn for a 2-D latent only; this model has latent_dim="
                         f"{model.latent_dim} (try flowvae manifold for a latent traversal)")
    log_prior = log_prior or prior_log_prob(model)
    ref = next(model.parameters())
    q = model.posterior(x.to(ref.device))
    batch = q.base.mean.shape[0]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, samples, 2, generator=generator).transpose(0, 1)  # image b's draws: one stream
    noise = noise.to(ref.device, ref.dtype)
    z_samples, log_q_samples = q.rsample_and_log_prob((samples,), noise)
    mean, std = q.base.mean, q.base.stddev
    out = []
    for b in range(batch):
        zs = z_samples[:, b].double().cpu()
        if box is None:
            low, high = torch.quantile(zs, 0.001, dim=0), torch.quantile(zs, 0.999, dim=0)
            q_box = _pad((low[0].item(), high[0].item(), low[1].item(), high[1].item()), 0.1)
            quad_box, shown = _mass_boxes(model, x[b], _union(q_box, (-4.0, 4.0, -4.0, 4.0)), log_prior)
            show_box = _pad(_union(q_box, shown), 0.05)
        else:
            quad_box = show_box = box
        points, area = grid_points(quad_box, grid)
        log_px = (torch.logsumexp(log_joint(model, x[b], points.reshape(-1, 2), log_prior), 0) + math.log(area)).item()
        if show_box != quad_box:
            points, _ = grid_points(show_box, grid)
        log_posterior = log_joint(model, x[b], points.reshape(-1, 2), log_prior).reshape(grid, grid) - log_px

        log_weights = log_q_samples[:, b].double().cpu() - log_joint(model, x[b], z_samples[:, b], log_prior).cpu()
        kl = log_weights.mean().item() + log_px
        kl_stderr = (log_weights.std() / math.sqrt(samples)).item() if samples > 1 else math.nan

        # q on the image of a z₀ grid over μ ± 5σ: exact density, no inverse needed.
        m, s = mean[b].double().cpu(), std[b].double().cpu()
        lows, highs = m - 5 * s, m + 5 * s
        axes = [torch.linspace(lows[i].item(), highs[i].item(), grid, dtype=torch.float64) for i in range(2)]
        z0 = torch.stack(torch.meshgrid(axes[0], axes[1], indexing="xy"), -1).reshape(-1, 2)
        log_q = torch.distributions.Normal(m, s).log_prob(z0).sum(-1)
        z_k = z0
        if q.flow is not None:
            context = None if q.context is None else q.context[b].expand(len(z0), -1)
            z_k, log_abs_det = q.flow(z0.to(ref.device, ref.dtype), context)
            z_k, log_q = z_k.double().cpu(), log_q - log_abs_det.double().cpu()
        out.append(PosteriorGrid(points[0, :, 0].clone(), points[:, 0, 1].clone(), log_posterior.cpu(), log_px,
                                 z_k.reshape(grid, grid, 2), log_q.reshape(grid, grid), kl, kl_stderr, samples))
    return out


def _zero_colour() -> Any:
    """The colour of 0 in :data:`CMAP`, for the parts of q's panel outside its mesh."""
    from matplotlib import colormaps

    return colormaps[CMAP](0.0)


def _hide_ticks(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def plot_posteriors(model: torch.nn.Module, x: torch.Tensor, out_png: str | Path, grid: int = 200,
                    samples: int = 2000, seed: int = 0, title: str | None = None) -> list[PosteriorGrid]:
    """One column per image x (B, C, H, W): the image, p(z|x) on a grid, q(z|x) on its warped mesh.

    Each density panel is scaled to its own maximum; white lines on q's panel are p(z|x)'s
    contours at exp(−c²/2) of its peak for c = 1, 2, 3 (a Gaussian's 1σ, 2σ, 3σ heights).
    Returns the grids drawn.
    """
    from flowvae.models.vae import as_unit_interval

    grids = posterior_grid(model, x, grid=grid, samples=samples, seed=seed)
    n = len(grids)
    fig = _figure(2.3 * n + 0.4, 5.9)
    axes = np.asarray(fig.subplots(3, n, squeeze=False, gridspec_kw={"height_ratios": [0.6, 1, 1]}))
    images = as_unit_interval(x.detach().cpu(), torch.float32)
    for j, g in enumerate(grids):
        image = images[j].permute(1, 2, 0).numpy()
        axes[0, j].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        _hide_ticks(axes[0, j])
        axes[0, j].set_title(f"x{j + 1}: log p(x) = {g.log_px:.2f}", fontsize=8)

        density = torch.exp(g.log_posterior - g.log_posterior.max()).numpy()
        z1, z2 = g.z1.numpy(), g.z2.numpy()
        ax = axes[1, j]
        ax.pcolormesh(z1, z2, density, shading="nearest", cmap=CMAP, vmin=0, vmax=1, rasterized=True)
        ax.set_title("true p(z|x)", fontsize=8)

        ax = axes[2, j]
        q_density = torch.exp(g.log_q - g.log_q.max()).numpy()
        ax.set_facecolor(_zero_colour())
        ax.pcolormesh(g.q_points[..., 0].numpy(), g.q_points[..., 1].numpy(), q_density, shading="gouraud",
                      cmap=CMAP, vmin=0, vmax=1, rasterized=True)
        levels = [math.exp(-0.5 * c * c) for c in (3, 2, 1)]
        ax.contour(z1, z2, density, levels=levels, colors="white", linewidths=0.6)
        ax.set_title(f"q(z|x), KL(q‖p) = {g.kl:.3f} ± {g.kl_stderr:.3f}\n(MC, {g.samples} samples)", fontsize=8)
        for ax in axes[1:, j]:
            box = g.box
            ax.set_xlim(box[0], box[1])
            ax.set_ylim(box[2], box[3])
            ax.tick_params(labelsize=6)
        axes[2, j].set_xlabel("z1", fontsize=7)
        if j == 0:
            axes[1, j].set_ylabel("z2", fontsize=7)
            axes[2, j].set_ylabel("z2", fontsize=7)
    fig.suptitle(title or "true posterior p(z|x) and the model's q(z|x); KL in nats", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_png)
    return grids


# ----------------------------------------------------------------------------------------------
# The decoded latent space


def prior_quantiles(n: int) -> torch.Tensor:
    """n points z_i = Φ⁻¹((i + ½)/n) of N(0, 1), evenly spaced in probability (Kingma & Welling 2014, Fig. 4)."""
    probabilities = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.distributions.Normal(0.0, 1.0).icdf(probabilities)


@torch.no_grad()
def manifold_images(model: torch.nn.Module, n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded means of an n × n grid of prior quantiles for a 2-D latent: images (n², C, H, W), values (n,).

    Row r holds z2 = values[n − 1 − r] (the top row has the largest z2); column c holds z1 = values[c].
    """
    if model.latent_dim != 2:
        raise ValueError(f"the manifold grid needs a 2-D latent; this model has latent_dim={model.latent_dim}")
    ref = next(model.parameters())
    values = prior_quantiles(n)
    z1, z2 = torch.meshgrid(values, values.flip(0), indexing="xy")
    z = torch.stack([z1, z2], -1).reshape(-1, 2).to(ref.device, ref.dtype)
    return model.likelihood.mean(model.decode(z)).cpu(), values


@torch.no_grad()
def traversal_images(model: torch.nn.Module, n: int = 20, dims: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i varies latent i over n prior quantiles with the others at 0, for the first ``dims`` latents:
    images (rows · n, C, H, W), values (n,)."""
    ref = next(model.parameters())
    values = prior_quantiles(n)
    rows = min(dims, model.latent_dim)
    z = torch.zeros(rows, n, model.latent_dim, dtype=torch.float64)
    for i in range(rows):
        z[i, :, i] = values
    return model.likelihood.mean(model.decode(z.reshape(-1, model.latent_dim).to(ref.device, ref.dtype))).cpu(), values


def plot_manifold(model: torch.nn.Module, out_png: str | Path, n: int = 20, dims: int = 8,
                  title: str | None = None) -> None:
    """The 2-D manifold grid for a 2-D latent, else a traversal of the first ``dims`` latents, to ``out_png``."""
    two_d = model.latent_dim == 2
    images, values = manifold_images(model, n) if two_d else traversal_images(model, n, dims)
    rows = n if two_d else len(images) // n
    grid = image_grid(images, nrow=n)
    _, c, h, w = images.shape
    cell = 0.42 if n <= 12 else 0.3
    fig = _figure(max(4.0, cell * n + 1.2), max(2.0, cell * rows + 1.0))
    ax = fig.subplots()
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    step = max(1, n // 6)
    centre = lambda i, size: 1 + i * (size + 1) + (size - 1) / 2  # noqa: E731  (pad = 1 in image_grid)
    cols = list(range(0, n, step))
    ax.set_xticks([centre(i, w) for i in cols], [f"{values[i]:.2f}" for i in cols], fontsize=7)
    if two_d:
        ax.set_yticks([centre(i, h) for i in cols], [f"{values[n - 1 - i]:.2f}" for i in cols], fontsize=7)
        ax.set_xlabel("z1 (prior quantiles)")
        ax.set_ylabel("z2")
    else:
        ax.set_yticks([centre(i, h) for i in range(rows)], [f"z{i + 1}" for i in range(rows)], fontsize=7)
        ax.set_xlabel("row i: z_i at prior quantiles, the others 0", fontsize=8)
    ax.set_title(title or ("decoded z grid" if two_d else "latent traversals"), fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_png)
