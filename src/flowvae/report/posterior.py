"""The posterior of a 2-D latent, seen on a grid.

    flowvae posterior --run RUN             # 2-D latent: p(z|x) on a grid next to q(z|x)

The true posterior of a 2-D model is p(z|x) = p(x|z) p(z) / p(x) with log p(x) by the midpoint
rule on a grid (log-sum-exp).  q(z|x) is drawn exactly, not from samples: a grid of z₀ is pushed
through the flow, z_K = flow(z₀, h), and log q(z_K) = log N(z₀; μ, σ²) − log|det ∂z_K/∂z₀| is
drawn on that warped mesh, so flows without an inverse (planar, Sylvester) need none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowvae.distributions import standard_normal_log_prob
from flowvae.evaluation import MAX_ROWS, auto_chunk_size
from flowvae.grids import Box, grid_points
from flowvae.models import LatentVariableModel, as_unit_interval
from flowvae.plots import save_figure
from flowvae.report.figures import CMAP, hide_ticks, new_figure, zero_colour
from flowvae.report.protocol import DecodesLatents, HasPosterior


def prior_log_prob(model: DecodesLatents) -> Callable[[torch.Tensor], torch.Tensor]:
    """log p(z) of a model: ``model.prior.log_prob`` if it has a prior with one, else N(0, I)."""
    prior = getattr(model, "prior", None)
    if prior is not None and callable(getattr(prior, "log_prob", None)):
        return prior.log_prob
    return standard_normal_log_prob


@torch.no_grad()
def log_joint(
    model: DecodesLatents,
    x: torch.Tensor,
    z: torch.Tensor,
    log_prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """log p(x, z) = log p(x|z) + log p(z) for one image x (C, H, W) at points z (N, D); float64 (N,).

    z is decoded ``chunk`` points at a time; by default as many as the evaluation's memory budget allows.
    """
    log_prior = log_prior or prior_log_prob(model)
    # a flowvae model knows its image shape and likelihood, which bound the decoded rows per chunk
    chunk = chunk or (auto_chunk_size(model, 1, MAX_ROWS)[1] if isinstance(model, LatentVariableModel) else 4096)
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

    z1: torch.Tensor  # (G,) cell centres along z1
    z2: torch.Tensor  # (G,) cell centres along z2
    log_posterior: torch.Tensor  # (G, G) normalised log p(z|x), indexed [z2, z1]
    log_px: float  # log p(x) by quadrature
    q_points: torch.Tensor  # (G, G, 2) z_K = flow(z₀) of a z₀ grid, indexed [z₀2, z₀1]
    log_q: torch.Tensor  # (G, G) log q(z_K|x) at q_points
    kl: float  # KL(q ‖ p(z|x)), Monte Carlo over q's samples
    kl_stderr: float  # its standard error
    samples: int  # the Monte Carlo sample size

    @property
    def box(self) -> Box:
        h1, h2 = (self.z1[1] - self.z1[0]).item() / 2, (self.z2[1] - self.z2[0]).item() / 2
        return (self.z1[0].item() - h1, self.z1[-1].item() + h1, self.z2[0].item() - h2, self.z2[-1].item() + h2)


def _union(a: Box, b: Box) -> Box:
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def _pad(box: Box, fraction: float) -> Box:
    w, h = max(box[1] - box[0], 1e-6), max(box[3] - box[2], 1e-6)
    return (box[0] - fraction * w, box[1] + fraction * w, box[2] - fraction * h, box[3] + fraction * h)


def _mass_boxes(
    model: DecodesLatents,
    x: torch.Tensor,
    start: Box,
    log_prior: Callable,
    drops: Sequence[float] = (20.0, 9.0),
    size: int = 128,
    tries: int = 6,
) -> list[Box]:
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
        boxes.append(
            (
                z1.min().item() - 1.5 * h1,
                z1.max().item() + 1.5 * h1,
                z2.min().item() - 1.5 * h2,
                z2.max().item() + 1.5 * h2,
            )
        )
    return boxes


@torch.no_grad()
def posterior_grid(
    model: HasPosterior,
    x: torch.Tensor,
    grid: int = 200,
    samples: int = 2000,
    box: Box | None = None,
    log_prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
) -> list[PosteriorGrid]:
    """The true posterior p(z|x) on a grid and the exact q(z|x) on a warped mesh, for images x (B, C, H, W).

    log p(x) = log Σ_cells p(x, z) ΔA (midpoint rule) over a box that holds the posterior's mass
    (found on a coarse grid: log p(x, z) within 20 nats of its maximum), and
    KL(q ‖ p(z|x)) = E_q[log q(z) − log p(x, z)] + log p(x) by Monte Carlo over ``samples`` draws.
    The grid returned (and drawn) covers where log p(x, z) is within 9 nats of its maximum and
    99.8% of q's samples; ``box`` fixes both grids instead.
    ``model`` needs ``latent_dim == 2``, ``posterior``, ``decode`` and ``likelihood``.
    """
    if model.latent_dim != 2:
        raise ValueError(
            f"the posterior can be drawn for a 2-D latent only; this model has latent_dim="
            f"{model.latent_dim} (try flowvae manifold for a latent traversal)"
        )
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
        out.append(
            PosteriorGrid(
                points[0, :, 0].clone(),
                points[:, 0, 1].clone(),
                log_posterior.cpu(),
                log_px,
                z_k.reshape(grid, grid, 2),
                log_q.reshape(grid, grid),
                kl,
                kl_stderr,
                samples,
            )
        )
    return out


def plot_posteriors(
    model: HasPosterior,
    x: torch.Tensor,
    out_png: str | Path,
    grid: int = 200,
    samples: int = 2000,
    seed: int = 0,
    title: str | None = None,
) -> list[PosteriorGrid]:
    """One column per image x (B, C, H, W): the image, p(z|x) on a grid, q(z|x) on its warped mesh.

    Each density panel is scaled to its own maximum; white lines on q's panel are p(z|x)'s
    contours at exp(−c²/2) of its peak for c = 1, 2, 3 (a Gaussian's 1σ, 2σ, 3σ heights).
    Returns the grids drawn.
    """
    grids = posterior_grid(model, x, grid=grid, samples=samples, seed=seed)
    n = len(grids)
    fig = new_figure(2.3 * n + 0.4, 5.9)
    axes = np.asarray(fig.subplots(3, n, squeeze=False, gridspec_kw={"height_ratios": [0.6, 1, 1]}))
    images = as_unit_interval(x.detach().cpu(), torch.float32)
    for j, g in enumerate(grids):
        image = images[j].permute(1, 2, 0).numpy()
        axes[0, j].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        hide_ticks(axes[0, j])
        axes[0, j].set_title(f"x{j + 1}: log p(x) = {g.log_px:.2f}", fontsize=8)

        density = torch.exp(g.log_posterior - g.log_posterior.max()).numpy()
        z1, z2 = g.z1.numpy(), g.z2.numpy()
        ax = axes[1, j]
        ax.pcolormesh(z1, z2, density, shading="nearest", cmap=CMAP, vmin=0, vmax=1, rasterized=True)
        ax.set_title("true p(z|x)", fontsize=8)

        ax = axes[2, j]
        q_density = torch.exp(g.log_q - g.log_q.max()).numpy()
        ax.set_facecolor(zero_colour())
        ax.pcolormesh(
            g.q_points[..., 0].numpy(),
            g.q_points[..., 1].numpy(),
            q_density,
            shading="gouraud",
            cmap=CMAP,
            vmin=0,
            vmax=1,
            rasterized=True,
        )
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
