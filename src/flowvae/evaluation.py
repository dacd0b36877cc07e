"""Dataset-level evaluation: negative ELBO, its parts, importance-weighted -log p(x), posterior diagnostics."""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from flowvae import objectives
from flowvae.distributed import Context
from flowvae.models.vae import VAE

# While importance sampling, at most this many elements of decoder output (times an activation
# factor for convolutional decoders) and at most MAX_ROWS latent samples are held at once.
DECODE_BUDGET = 2 ** 25
MAX_ROWS = 2 ** 14


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the networks: 'bf16' or 'fp16' autocast, or nothing for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def auto_chunk_size(model: VAE, batch_size: int, samples: int) -> int:
    """Samples per chunk so that chunk · batch stays within :data:`DECODE_BUDGET` and :data:`MAX_ROWS`."""
    per_image = model.likelihood.params_per_pixel * math.prod(model.image_shape)
    conv = any(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in model.decoder.modules())
    per_image *= 64 if conv else 1
    rows = min(MAX_ROWS, DECODE_BUDGET // per_image)
    return max(1, min(samples, rows // batch_size))


@torch.no_grad()
def evaluate(model: VAE, data: torch.Tensor, *, batch_size: int = 100, samples: int = 0, chunk_size: int | None = None,
             device: torch.device | str = "cpu", progress: bool = False, desc: str = "eval", seed: int | None = None,
             context: Context = Context(), precision: str = "fp32") -> dict[str, float]:
    """Mean over ``data`` (N, C, H, W) of -ELBO, -log p(x|z) and KL (one posterior sample each),
    and with ``samples`` = K > 0 the importance-weighted -log p(x).  Sums accumulate in float64.

    With ``seed`` each batch draws its noise from its own generator seeded by (seed, batch index),
    so results do not depend on how batches are spread over workers: under DDP (``context``)
    worker r takes batches r, r + W, … and the sums are all-reduced once at the end.
    ``precision`` runs the networks under autocast; the densities are summed in float32/64.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    names = ["neg_elbo", "reconstruction", "kl"] + (["nll"] if samples else [])
    totals = torch.zeros(len(names), dtype=torch.float64, device=device)
    if samples:
        chunk_size = chunk_size or auto_chunk_size(model, batch_size, samples)
    starts = list(range(0, len(data), batch_size))[context.rank::context.world_size]
    for start in tqdm(starts, desc=desc, disable=not progress or not context.is_main, leave=False):
        x = data[start:start + batch_size].to(device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device).manual_seed(seed * 1_000_003 + start // batch_size)
        noise = None if generator is None else torch.randn(1, len(x), model.latent_dim, generator=generator,
                                                             device=device, dtype=next(model.parameters()).dtype)
        with autocast(device, precision):
            ld = model(x, noise=noise)
            batch = [objectives.negative_elbo(ld).double().sum(), -ld.log_likelihood.double().sum(),
                     ld.kl.double().sum()]
            if samples:
                batch.append(objectives.importance_weighted_nll(model, x, samples, chunk_size, generator).sum())
        totals += torch.stack(batch)
    context.all_reduce_sum(totals)
    model.train(was_training)
    results = dict(zip(names, (totals / len(data)).tolist()))
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
