"""ELBO, IWAE bound, importance-weighted -log p(x) and bits/dim, from a model's log-densities.

With log w_k = log p(x, z_k) - log q(z_k|x), z_k ~ q(z|x):
    ELBO = E_q[log w],   -log p(x) ≈ -log (1/K) Σ_k w_k   (Burda et al. 2016; an upper bound on
    -log p(x) in expectation that tightens as K grows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowvae.models.base import LatentVariableModel, LogDensities, Noise, draw_noise, select_noise


def negative_elbo(ld: LogDensities, beta: float = 1.0) -> torch.Tensor:
    """-(E_q[log p(x|z)] - β · E_q[log q(z|x) - log p(z)]) per data point, averaged over the K samples: (B,)."""
    return -(ld.log_likelihood - beta * ld.kl).mean(0)


def training_loss(ld: LogDensities, beta: float = 1.0, free_bits: float = 0.0,
                  normalizer: float | None = None) -> torch.Tensor:
    """Scalar loss: the negative ELBO with KL weight β (warm-up) and free bits, summed over the
    batch and divided by ``normalizer`` (default: the batch size, i.e. the batch mean).

    Free bits (Kingma et al. 2016) per KL group g of the model (the whole latent vector of a
    single-latent VAE, each layer of a ladder, each (layer, channel) of spatial latents): the group's
    term is max(Σ_batch KL_g, λ · units_g · B), so no gradient pushes a group's batch-mean KL below
    λ nats per unit.
    """
    batch = ld.kl.shape[-1]
    kl = ld.kl_groups.mean(0).sum(0)                                    # (G,), summed over the batch
    if free_bits > 0:
        units = torch.tensor(ld.group_units, dtype=kl.dtype, device=kl.device)
        kl = torch.maximum(kl, free_bits * units * batch)
    return (-ld.log_likelihood.mean(0).sum() + beta * kl.sum()) / (batch if normalizer is None else normalizer)


def iwae_bound(ld: LogDensities) -> torch.Tensor:
    """log (1/K) Σ_k w_k per data point: (B,)."""
    return torch.logsumexp(ld.log_weight, 0) - math.log(ld.log_weight.shape[0])


# Importance samples are drawn this many at a time for all the batch's data points, in order, so an
# estimate depends on the generator and K only, not on the chunks that memory dictates.
NOISE_BLOCK = 50


@dataclass
class ImportanceWeightedEstimate:
    """-log p(x) ≈ -log (1/K) Σ_k w_k per data point, with its Monte Carlo error; each (B,) float64.

    ``ess`` is the effective sample size (Σ w)² / Σ w² of the K normalised weights (K when all are
    equal, 1 when one dominates); ``mc_se`` the delta-method standard error of log (1/K) Σ_k w_k,
    √(Var(w) / (K · mean(w)²)) = √(1/ESS − 1/K): the spread of ``nll`` over repeated draws.
    """

    nll: torch.Tensor
    mc_se: torch.Tensor
    ess: torch.Tensor


class _NoiseStream:
    """The noise of K posterior draws of B data points, drawn :data:`NOISE_BLOCK` samples at a time
    and handed out in chunks of any size."""

    def __init__(self, model: LatentVariableModel, batch: int, samples: int, generator: torch.Generator | None,
                 device: torch.device) -> None:
        self.model, self.batch, self.left, self.generator, self.device = model, batch, samples, generator, device
        self.buffer: Noise = {}

    def take(self, k: int) -> Noise:
        blocks, held = [self.buffer] if self.buffer else [], self._held()
        while held < k:
            block = draw_noise(self.model, min(NOISE_BLOCK, self.left), self.batch, generator=self.generator,
                               device=self.device)
            self.left -= min(NOISE_BLOCK, self.left)
            blocks.append(block)
            held += next(iter(block.values())).shape[0]
        noise = blocks[0] if len(blocks) == 1 else {name: torch.cat([b[name] for b in blocks]) for name in blocks[0]}
        self.buffer = {name: t[k:] for name, t in noise.items()} if held > k else {}
        return {name: t[:k] for name, t in noise.items()}

    def _held(self) -> int:
        return next(iter(self.buffer.values())).shape[0] if self.buffer else 0


@torch.no_grad()
def importance_weighted_estimate(model: LatentVariableModel, x: torch.Tensor, samples: int = 5000,
                                 chunk_size: int = 500, generator: torch.Generator | None = None,
                                 score: Callable[..., LogDensities] | None = None,
                                 points: int | None = None) -> ImportanceWeightedEstimate:
    """-log p(x) for x (B, C, H, W) with K = ``samples`` importance samples, its Monte Carlo
    standard error and the effective sample size (see :class:`ImportanceWeightedEstimate`).

    The sample-independent inference (``model.encode``) runs once per ``points`` data points
    (default: all B); samples are scored ``chunk_size`` at a time for ``points`` data points
    together, and the log-sum-exps of log w and 2 log w accumulate in float64.  ``generator`` (on
    x's device) makes the draw reproducible, whatever ``chunk_size`` and ``points`` are; noise is
    drawn in the model's dtype, never in 16 bits.  ``score`` replaces ``model.log_densities`` (same
    signature), e.g. by its ``torch.compile``'d version.
    """
    if samples < 1 or chunk_size < 1:
        raise ValueError(f"samples and chunk_size must be >= 1, got {samples} and {chunk_size}")
    batch = len(x)
    points = batch if points is None else max(1, points)
    parts = [(slice(s, s + points), model.encode(x[s:s + points])) for s in range(0, batch, points)]
    score = score or model.log_densities
    stream = _NoiseStream(model, batch, samples, generator, x.device)
    total = torch.full((batch,), -math.inf, dtype=torch.float64, device=x.device)
    total_sq = total.clone()
    for start in range(0, samples, chunk_size):
        k = min(chunk_size, samples - start)
        noise = stream.take(k)
        for index, encoded in parts:
            part_noise = noise if len(parts) == 1 else select_noise(noise, index)
            log_w = score(x[index], encoded, k, part_noise).log_weight.double()
            total[index] = torch.logaddexp(total[index], torch.logsumexp(log_w, 0))
            total_sq[index] = torch.logaddexp(total_sq[index], torch.logsumexp(2 * log_w, 0))
    ess = torch.exp(2 * total - total_sq)
    mc_se = (1 / ess - 1 / samples).clamp(min=0).sqrt()
    return ImportanceWeightedEstimate(nll=-(total - math.log(samples)), mc_se=mc_se, ess=ess)


def importance_weighted_nll(model: LatentVariableModel, x: torch.Tensor, samples: int = 5000, chunk_size: int = 500,
                            generator: torch.Generator | None = None,
                            score: Callable[..., LogDensities] | None = None) -> torch.Tensor:
    """-log p(x) ≈ -log (1/K) Σ_k w_k for x (B, C, H, W) with K = ``samples``: (B,) float64 nats.

    The ``nll`` of :func:`importance_weighted_estimate`, which says how the samples are drawn.
    """
    return importance_weighted_estimate(model, x, samples, chunk_size, generator, score).nll


def bits_per_dim(nats: torch.Tensor | float, dim: int) -> torch.Tensor | float:
    """nats / (D ln 2)."""
    return nats / (dim * math.log(2.0))
