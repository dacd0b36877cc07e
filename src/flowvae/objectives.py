"""ELBO, IWAE bound, importance-weighted -log p(x) and bits/dim, from a model's log-densities.

With log w_k = log p(x, z_k) - log q(z_k|x), z_k ~ q(z|x):
    ELBO = E_q[log w],   -log p(x) ≈ -log (1/K) Σ_k w_k   (Burda et al. 2016; an upper bound on
    -log p(x) in expectation that tightens as K grows).
"""

from __future__ import annotations

import math

import torch

from flowvae.models.vae import VAE, LogDensities


def negative_elbo(ld: LogDensities, beta: float = 1.0) -> torch.Tensor:
    """-(E_q[log p(x|z)] - β · E_q[log q(z|x) - log p(z)]) per data point, averaged over the K samples: (B,)."""
    return -(ld.log_likelihood - beta * ld.kl).mean(0)


def training_loss(ld: LogDensities, beta: float = 1.0, free_bits: float = 0.0,
                  normalizer: float | None = None) -> torch.Tensor:
    """Scalar loss: the negative ELBO with KL weight β (warm-up) and free bits, summed over the
    batch and divided by ``normalizer`` (default: the batch size, i.e. the batch mean).

    Free bits (Kingma et al. 2016) with the whole latent vector as one group: the KL term is
    max(Σ KL, free_bits · D · B), so no gradient pushes the mean KL below ``free_bits`` nats per latent.
    """
    batch = ld.kl.shape[-1]
    kl = ld.kl.mean(0).sum()
    if free_bits > 0:
        kl = torch.clamp(kl, min=free_bits * ld.z.shape[-1] * batch)
    return (-ld.log_likelihood.mean(0).sum() + beta * kl) / (batch if normalizer is None else normalizer)


def iwae_bound(ld: LogDensities) -> torch.Tensor:
    """log (1/K) Σ_k w_k per data point: (B,)."""
    return torch.logsumexp(ld.log_weight, 0) - math.log(ld.log_weight.shape[0])


@torch.no_grad()
def importance_weighted_nll(model: VAE, x: torch.Tensor, samples: int = 5000, chunk_size: int = 500,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """-log p(x) ≈ -log (1/K) Σ_k w_k for x (B, C, H, W) with K = ``samples``: (B,) float64 nats.

    The encoder runs once; samples are drawn ``chunk_size`` at a time for all B data points
    together (memory O(chunk_size · B)), and the log-sum-exp is accumulated in float64.
    ``generator`` (on x's device) makes the draw reproducible.
    """
    if samples < 1 or chunk_size < 1:
        raise ValueError(f"samples and chunk_size must be >= 1, got {samples} and {chunk_size}")
    q = model.posterior(x)
    total = None
    for start in range(0, samples, chunk_size):
        k = min(chunk_size, samples - start)
        noise = None if generator is None else torch.randn(k, len(x), model.latent_dim, generator=generator,
                                                             device=x.device, dtype=q.base.mean.dtype)
        log_w = model.log_densities(x, q, k, noise).log_weight.double()
        chunk = torch.logsumexp(log_w, 0)
        total = chunk if total is None else torch.logaddexp(total, chunk)
    return -(total - math.log(samples))


def bits_per_dim(nats: torch.Tensor | float, dim: int) -> torch.Tensor | float:
    """nats / (D ln 2)."""
    return nats / (dim * math.log(2.0))
