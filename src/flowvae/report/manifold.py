"""The decoded latent space: a grid of z for a 2-D latent, latent traversals otherwise.

flowvae manifold --run RUN              # decoded grid of z (2-D) or latent traversals
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowvae.plots import image_grid, save_figure
from flowvae.report.figures import new_figure
from flowvae.report.protocol import DecodesLatents


def prior_quantiles(n: int) -> torch.Tensor:
    """n points z_i = Φ⁻¹((i + ½)/n) of N(0, 1), evenly spaced in probability (Kingma & Welling 2014, Fig. 4)."""
    probabilities = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.distributions.Normal(0.0, 1.0).icdf(probabilities)


@torch.no_grad()
def manifold_images(model: DecodesLatents, n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
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
def traversal_images(model: DecodesLatents, n: int = 20, dims: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i varies latent i over n prior quantiles with the others at 0, for the first ``dims`` latents:
    images (rows · n, C, H, W), values (n,)."""
    ref = next(model.parameters())
    values = prior_quantiles(n)
    rows = min(dims, model.latent_dim)
    z = torch.zeros(rows, n, model.latent_dim, dtype=torch.float64)
    for i in range(rows):
        z[i, :, i] = values
    return model.likelihood.mean(model.decode(z.reshape(-1, model.latent_dim).to(ref.device, ref.dtype))).cpu(), values


def plot_manifold(
    model: DecodesLatents, out_png: str | Path, n: int = 20, dims: int = 8, title: str | None = None
) -> None:
    """The 2-D manifold grid for a 2-D latent, else a traversal of the first ``dims`` latents, to ``out_png``."""
    two_d = model.latent_dim == 2
    images, values = manifold_images(model, n) if two_d else traversal_images(model, n, dims)
    rows = n if two_d else len(images) // n
    grid = image_grid(images, nrow=n)
    _, c, h, w = images.shape
    cell = 0.42 if n <= 12 else 0.3
    fig = new_figure(max(4.0, cell * n + 1.2), max(2.0, cell * rows + 1.0))
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
