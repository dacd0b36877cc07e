"""Dataset-level evaluation: negative ELBO, its parts, importance-weighted -log p(x), posterior diagnostics."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from flowvae import objectives
from flowvae.models.vae import VAE

# While importance sampling, at most this many elements of decoder output (times an activation
# factor for convolutional decoders) and at most MAX_ROWS latent samples are held at once.
DECODE_BUDGET = 2 ** 25
MAX_ROWS = 2 ** 14


def auto_chunk_size(model: VAE, batch_size: int, samples: int) -> int:
    """Samples per chunk so that chunk · batch stays within :data:`DECODE_BUDGET` and :data:`MAX_ROWS`."""
    per_image = model.likelihood.params_per_pixel * math.prod(model.image_shape)
    conv = any(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in model.decoder.modules())
    per_image *= 64 if conv else 1
    rows = min(MAX_ROWS, DECODE_BUDGET // per_image)
    return max(1, min(samples, rows // batch_size))


@torch.no_grad()
def evaluate(model: VAE, data: torch.Tensor, *, batch_size: int = 100, samples: int = 0, chunk_size: int | None = None,
             device: torch.device | str = "cpu", progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Mean over ``data`` (N, C, H, W) of -ELBO, -log p(x|z) and KL (one posterior sample each),
    and with ``samples`` = K > 0 the importance-weighted -log p(x).  Sums accumulate in float64."""
    was_training = model.training
    model.eval()
    totals = {"neg_elbo": 0.0, "reconstruction": 0.0, "kl": 0.0}
    if samples:
        totals["nll"] = 0.0
        chunk_size = chunk_size or auto_chunk_size(model, batch_size, samples)
    for start in tqdm(range(0, len(data), batch_size), desc=desc, disable=not progress, leave=False):
        x = data[start:start + batch_size].to(device)
        ld = model(x)
        totals["neg_elbo"] += objectives.negative_elbo(ld).double().sum().item()
        totals["reconstruction"] -= ld.log_likelihood.double().sum().item()
        totals["kl"] += ld.kl.double().sum().item()
        if samples:
            totals["nll"] += objectives.importance_weighted_nll(model, x, samples, chunk_size).sum().item()
    model.train(was_training)
    results = {k: v / len(data) for k, v in totals.items()}
    if samples:
        results["nll_samples"] = samples
    return results


@torch.no_grad()
def posterior_diagnostics(model: VAE, data: torch.Tensor, *, batch_size: int = 100, samples: int = 16,
                          device: torch.device | str = "cpu", threshold: float = 0.01) -> dict:
    """Active units (Burda et al. 2016): dimension u is active if Var_x(E_q[z_u | x]) > ``threshold``,
    with E_q estimated from ``samples`` posterior samples (flows make it non-Gaussian).  Also the
    per-dimension KL of the base Gaussian q₀(z₀|x) to N(0, 1), averaged over x (the exact per-
    dimension KL when there is no flow)."""
    was_training = model.training
    model.eval()
    means, base_kl = [], torch.zeros(model.latent_dim, dtype=torch.float64, device=device)
    for start in range(0, len(data), batch_size):
        x = data[start:start + batch_size].to(device)
        q = model.posterior(x)
        means.append(q.rsample((samples,)).mean(0).double())
        mu, std = q.base.base_dist.loc.double(), q.base.base_dist.scale.double()
        base_kl += (0.5 * (mu * mu + std * std - 1.0) - torch.log(std)).sum(0)
    model.train(was_training)
    variance = torch.cat(means).var(0)
    return {"active_units": int((variance > threshold).sum()), "active_threshold": threshold,
            "posterior_mean_variance": variance.cpu().tolist(),
            "kl_per_dim_base": (base_kl / len(data)).cpu().tolist()}
