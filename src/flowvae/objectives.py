"""ELBO, IWAE bound, importance-weighted -log p(x) and bits/dim, from a model's log-densities.

With log w_k = log p(x, z_k) - log q(z_k|x), z_k ~ q(z|x):
    ELBO = E_q[log w],   -log p(x) ≈ -log (1/K) Σ_k w_k   (Burda et al. 2016; an upper bound on
    -log p(x) in expectation that tightens as K grows).

Examples:
    >>> import torch
    >>> from flowvae import objectives
    >>> from flowvae.models import build_vae
    >>> model = build_vae("mlp", (1, 8, 8), latent_dim=2, hidden=16, flow="planar", flow_steps=2)
    >>> x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.3))
    >>> ld = model(x, samples=3)                       # log-densities, each (K, B) = (3, 5)
    >>> tuple(ld.log_likelihood.shape), tuple(objectives.negative_elbo(ld).shape)
    ((3, 5), (5,))
    >>> objectives.training_loss(ld, beta=0.5).shape   # a scalar to minimise
    torch.Size([])
    >>> objectives.importance_weighted_nll(model, x, samples=100).dtype
    torch.float64
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from flowvae.models.base import LatentVariableModel, LogDensities, draw_noise


def negative_elbo(ld: LogDensities, beta: float = 1.0) -> torch.Tensor:
    """-(E_q[log p(x|z)] - β · E_q[log q(z|x) - log p(z)]) per data point, averaged over the K samples.

    Args:
        ld: a model's :class:`~flowvae.models.LogDensities`, fields (K, B).
        beta: the KL weight β (1: the ELBO itself).

    Returns:
        (B,) nats.
    """
    return -(ld.log_likelihood - beta * ld.kl).mean(0)


def training_loss(ld: LogDensities, beta: float = 1.0, free_bits: float = 0.0,
                  normalizer: float | None = None) -> torch.Tensor:
    """Scalar loss: the negative ELBO with KL weight β (warm-up) and free bits, summed over the
    batch and divided by ``normalizer`` (default: the batch size, i.e. the batch mean).

    Free bits (Kingma et al. 2016) per KL group g of the model (the whole latent vector of a
    single-latent VAE, each layer of a ladder, each (layer, channel) of spatial latents): the group's
    term is max(Σ_batch KL_g, λ · units_g · B), so no gradient pushes a group's batch-mean KL below
    λ nats per unit.

    Args:
        ld: a model's :class:`~flowvae.models.LogDensities`, fields (K, B).
        beta: the KL weight β.
        free_bits: λ, nats per latent unit of each KL group (0: off).
        normalizer: what the batch sum is divided by (default B).

    Returns:
        A 0-d tensor.
    """
    batch = ld.kl.shape[-1]
    kl = ld.kl_groups.mean(0).sum(0)                                    # (G,), summed over the batch
    if free_bits > 0:
        units = torch.tensor(ld.group_units, dtype=kl.dtype, device=kl.device)
        kl = torch.maximum(kl, free_bits * units * batch)
    return (-ld.log_likelihood.mean(0).sum() + beta * kl.sum()) / (batch if normalizer is None else normalizer)


def iwae_bound(ld: LogDensities) -> torch.Tensor:
    """log (1/K) Σ_k w_k per data point (Burda et al. 2016): (B,) from log-densities (K, B)."""
    return torch.logsumexp(ld.log_weight, 0) - math.log(ld.log_weight.shape[0])


@torch.no_grad()
def importance_weighted_nll(model: LatentVariableModel, x: torch.Tensor, samples: int = 5000, chunk_size: int = 500,
                            generator: torch.Generator | None = None,
                            score: Callable[..., LogDensities] | None = None) -> torch.Tensor:
    """-log p(x) ≈ -log (1/K) Σ_k w_k for x (B, C, H, W) with K = ``samples``: (B,) float64 nats.

    The sample-independent inference (``model.encode``) runs once; samples are drawn
    ``chunk_size`` at a time for all B data points together (memory O(chunk_size · B)), and the
    log-sum-exp is accumulated in float64.  ``generator`` (on x's device) makes the draw
    reproducible; noise is drawn in the model's dtype, never in 16 bits.  ``score`` replaces
    ``model.log_densities`` (same signature), e.g. by its ``torch.compile``'d version.
    """
    if samples < 1 or chunk_size < 1:
        raise ValueError(f"samples and chunk_size must be >= 1, got {samples} and {chunk_size}")
    encoded = model.encode(x)
    score = score or model.log_densities
    total = None
    for start in range(0, samples, chunk_size):
        k = min(chunk_size, samples - start)
        noise = None if generator is None else draw_noise(model, k, len(x), generator=generator, device=x.device)
        log_w = score(x, encoded, k, noise).log_weight.double()
        chunk = torch.logsumexp(log_w, 0)
        total = chunk if total is None else torch.logaddexp(total, chunk)
    return -(total - math.log(samples))


def bits_per_dim(nats: torch.Tensor | float, dim: int) -> torch.Tensor | float:
    """nats / (D ln 2): a negative log-likelihood of D dimensions in bits per dimension.

    >>> round(bits_per_dim(100.0, 784), 4)
    0.184
    """
    return nats / (dim * math.log(2.0))
