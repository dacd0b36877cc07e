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
from dataclasses import dataclass

import torch

from flowvae.models.base import LatentVariableModel, LogDensities, Noise, draw_noise


def negative_elbo(ld: LogDensities, beta: float = 1.0) -> torch.Tensor:
    """-(E_q[log p(x|z)] - β · E_q[log q(z|x) - log p(z)]) per data point, averaged over the K samples.

    Args:
        ld: a model's :class:`~flowvae.models.LogDensities`, fields (K, B).
        beta: the KL weight β (1: the ELBO itself).

    Returns:
        (B,) nats.
    """
    return -(ld.log_likelihood - beta * ld.kl).mean(0)


def elbo_loss(
    ld: LogDensities, beta: float = 1.0, free_bits: float = 0.0, normalizer: float | None = None
) -> torch.Tensor:
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
    assert ld.kl_groups is not None  # LogDensities.__post_init__ sets it
    kl = ld.kl_groups.mean(0).sum(0)  # (G,), summed over the batch
    if free_bits > 0:
        kl = kl.clamp_min(_kl_floor(ld, free_bits, kl))
    return (-ld.log_likelihood.mean(0).sum() + beta * kl.sum()) / (batch if normalizer is None else normalizer)


def _kl_floor(ld: LogDensities, free_bits: float, kl: torch.Tensor) -> torch.Tensor | float:
    """Each KL group's free-bits floor λ · units_g · B, for ``kl`` (G,) summed over the batch: a
    Python number where every group has as many units (every built-in model: no host-to-device
    copy per step), else a (G,) tensor."""
    batch = ld.kl.shape[-1]
    assert ld.group_units is not None  # LogDensities.__post_init__ sets it
    if len(set(ld.group_units)) == 1:
        return free_bits * ld.group_units[0] * batch
    units = torch.tensor(ld.group_units, dtype=kl.dtype).to(kl.device, non_blocking=True)
    return free_bits * batch * units


def iwae_loss(
    ld: LogDensities, beta: float = 1.0, free_bits: float = 0.0, normalizer: float | None = None
) -> torch.Tensor:
    """Scalar loss: −log (1/K) Σ_k w_k^β per data point (Burda et al. 2016), with the annealed
    weights log w^β = log p(x|z) + β (log p(z) − log q(z|x)) of :func:`annealed_log_weight`,
    summed over the batch and divided by ``normalizer`` (default: the batch size).

    At β = 1 this is −:func:`iwae_bound`; at K = 1 it is :func:`elbo_loss`'s β-ELBO.  Free bits:
    a KL group g whose (sample-mean, batch-summed) KL lies below its floor λ · units_g · B adds
    β · (floor − KL_g), which is :func:`elbo_loss`'s max(KL_g, floor) exactly at K = 1 and for
    K > 1 adds back the average pull that drags the group's KL below its floor.
    """
    batch, samples = ld.kl.shape[-1], ld.kl.shape[0]
    bound = torch.logsumexp(annealed_log_weight(ld, beta), 0) - math.log(samples)  # (B,)
    loss = -bound.sum()
    if free_bits > 0:
        assert ld.kl_groups is not None  # LogDensities.__post_init__ sets it
        kl = ld.kl_groups.mean(0).sum(0)  # (G,)
        loss = loss + beta * torch.relu(_kl_floor(ld, free_bits, kl) - kl).sum()
    return loss / (batch if normalizer is None else normalizer)


def iwae_bound(ld: LogDensities) -> torch.Tensor:
    """log (1/K) Σ_k w_k per data point (Burda et al. 2016): (B,) from log-densities (K, B)."""
    return torch.logsumexp(ld.log_weight, 0) - math.log(ld.log_weight.shape[0])


OBJECTIVES = ("elbo", "iwae")
GRADIENTS = ("reparam", "stl", "dreg")


def gradient_problem(objective: str, samples: int, gradient: str, free_bits: float) -> str | None:
    """Why ``gradient`` would be a biased estimator of ``objective``'s gradient, or None.

    STL (Roeder et al. 2017) drops the score term E_q[∇ log q] = 0 of the ELBO; of the IWAE bound
    with K > 1 the dropped term Σ_k w̃_k ∇ log q(z_k) is not zero in expectation (Tucker et al.
    2018), and free bits' floor depends on the sample, so neither may drop it.
    """
    if gradient == "stl" and objective == "iwae" and samples > 1:
        return "--gradient stl is biased for --objective iwae with --train-samples > 1; use --gradient dreg"
    if gradient != "reparam" and free_bits > 0:
        return (
            f"--gradient {gradient} is not unbiased with --free-bits > 0 (the floor depends on the sample); "
            "use --gradient reparam or --free-bits 0"
        )
    return None


def annealed_log_weight(ld: LogDensities, beta: float = 1.0) -> torch.Tensor:
    """log p(x|z) + β (log p(z) − log q(z|x)), (K, B): log w at β = 1, the β-ELBO's integrand at K = 1."""
    return ld.log_likelihood - beta * ld.kl


def training_loss(
    ld: LogDensities,
    beta: float = 1.0,
    free_bits: float = 0.0,
    normalizer: float | None = None,
    objective: str = "elbo",
    gradient: str = "reparam",
) -> torch.Tensor:
    """The scalar training loss for ``objective`` 'elbo' (:func:`elbo_loss`) or 'iwae'
    (:func:`iwae_loss`), with the gradient estimator ``gradient``.

    'reparam' differentiates the loss as it is.  'stl' and 'dreg' expect ``ld`` from a model's
    ``path_log_densities`` (log q scored with the posterior's parameters held constant); 'dreg'
    (Tucker et al. 2018) also scales the gradient that reaches each sample z_k by its normalised
    weight w̃_k, so the posterior's path gradient is Σ_k w̃_k² ∂log w_k/∂z_k ∂z_k/∂φ; every other
    gradient (the decoder's, the prior's) keeps its weight w̃_k.  Under KL warm-up (β < 1) the
    scale is 1 − β + β w̃_k, the exact doubly reparameterized gradient of the annealed bound.  For
    the ELBO, and at K = 1, 'dreg' is 'stl'.
    """
    if objective not in OBJECTIVES or gradient not in GRADIENTS:
        raise ValueError(
            f"objective must be one of {OBJECTIVES} and gradient one of {GRADIENTS}, got {objective!r} and {gradient!r}"
        )
    samples = ld.log_likelihood.shape[0]
    problem = gradient_problem(objective, samples, gradient, free_bits)
    if problem:
        raise ValueError(problem)
    if gradient == "dreg" and objective == "iwae" and samples > 1 and torch.is_grad_enabled():
        # E[Σ_k w̃_k ∂_φ log q(z_k)] = E[Σ_k (w̃_k − w̃_k²) ∂log w_k^β/∂z_k ∂z_k/∂φ] (Tucker et al. 2018),
        # so the bound's −β·(score term) becomes a path term: each z_k's gradient is scaled by 1 − β + β w̃_k.
        weights = torch.softmax(annealed_log_weight(ld, beta).detach(), 0)  # w̃ (K, B)
        factor = (1 - beta) + beta * weights
        for z in ld.latents.values():
            if z.requires_grad:
                scale = factor.reshape(*factor.shape, *(1,) * (z.dim() - 2)).to(z.dtype)
                z.register_hook(lambda grad, scale=scale: grad * scale)
    if objective == "iwae":
        return iwae_loss(ld, beta, free_bits, normalizer)
    return elbo_loss(ld, beta, free_bits, normalizer)


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

    def __init__(
        self,
        model: LatentVariableModel,
        batch: int,
        samples: int,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> None:
        self.model, self.batch, self.left, self.generator, self.device = model, batch, samples, generator, device
        self.buffer: Noise = {}

    def take(self, k: int) -> Noise:
        blocks, held = [self.buffer] if self.buffer else [], self._held()
        while held < k:
            block = draw_noise(
                self.model, min(NOISE_BLOCK, self.left), self.batch, generator=self.generator, device=self.device
            )
            self.left -= min(NOISE_BLOCK, self.left)
            blocks.append(block)
            held += next(iter(block.values())).shape[0]
        noise = blocks[0] if len(blocks) == 1 else {name: torch.cat([b[name] for b in blocks]) for name in blocks[0]}
        self.buffer = {name: t.narrow(0, k, held - k) for name, t in noise.items()} if held > k else {}
        return {name: t.narrow(0, 0, k) for name, t in noise.items()}

    def _held(self) -> int:
        return next(iter(self.buffer.values())).shape[0] if self.buffer else 0


@torch.no_grad()
def importance_weighted_estimate(
    model: LatentVariableModel,
    x: torch.Tensor,
    samples: int = 5000,
    chunk_size: int = 500,
    generator: torch.Generator | None = None,
    score: Callable[..., LogDensities] | None = None,
    points: int | None = None,
) -> ImportanceWeightedEstimate:
    """-log p(x) for x (B, C, H, W) with K = ``samples`` importance samples, its Monte Carlo
    standard error and the effective sample size (see :class:`ImportanceWeightedEstimate`).

    The sample-independent inference (``model.encode``) runs once per ``points`` data points
    (default: all B); samples are scored ``chunk_size`` at a time for ``points`` data points
    together, and the log-sum-exps of log w and 2 log w accumulate in float64.  ``generator`` (on
    x's device) makes the draw reproducible, whatever ``chunk_size`` and ``points`` are; noise is
    drawn in the model's dtype, never in 16 bits.  ``score`` replaces ``model.log_densities`` (same
    signature), e.g. by its ``torch.compile``'d version.

    Examples:
        >>> import torch
        >>> from flowvae.models import build_vae
        >>> vae = build_vae("mlp", (1, 8, 8), latent_dim=2, hidden=16)
        >>> x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.5))
        >>> est = importance_weighted_estimate(vae, x, samples=200, generator=torch.Generator().manual_seed(0))
        >>> est.nll.shape, est.nll.dtype, bool((est.mc_se > 0).all()), bool((est.ess <= 200).all())
        (torch.Size([4]), torch.float64, True, True)
    """
    if samples < 1 or chunk_size < 1:
        raise ValueError(f"samples and chunk_size must be >= 1, got {samples} and {chunk_size}")
    batch = len(x)
    parts = x.split(batch if points is None else max(1, points))
    encoded = [model.encode(part) for part in parts]
    score = score or model.log_densities
    stream = _NoiseStream(model, batch, samples, generator, x.device)
    totals = [torch.full((len(part),), -math.inf, dtype=torch.float64, device=x.device) for part in parts]
    totals_sq = [t.clone() for t in totals]
    for start in range(0, samples, chunk_size):
        k = min(chunk_size, samples - start)
        noise = stream.take(k)
        first = 0
        for i, part in enumerate(parts):
            part_noise = noise if len(parts) == 1 else {n: t.narrow(1, first, len(part)) for n, t in noise.items()}
            log_w = score(part, encoded[i], k, part_noise).log_weight.double()
            totals[i] = torch.logaddexp(totals[i], torch.logsumexp(log_w, 0))
            totals_sq[i] = torch.logaddexp(totals_sq[i], torch.logsumexp(2 * log_w, 0))
            first += len(part)
    total, total_sq = torch.cat(totals), torch.cat(totals_sq)
    ess = torch.exp(2 * total - total_sq)
    mc_se = (1 / ess - 1 / samples).clamp(min=0).sqrt()
    return ImportanceWeightedEstimate(nll=-(total - math.log(samples)), mc_se=mc_se, ess=ess)


def importance_weighted_nll(
    model: LatentVariableModel,
    x: torch.Tensor,
    samples: int = 5000,
    chunk_size: int = 500,
    generator: torch.Generator | None = None,
    score: Callable[..., LogDensities] | None = None,
) -> torch.Tensor:
    """-log p(x) ≈ -log (1/K) Σ_k w_k for x (B, C, H, W) with K = ``samples``: (B,) float64 nats.

    The ``nll`` of :func:`importance_weighted_estimate`, which says how the samples are drawn.
    """
    return importance_weighted_estimate(model, x, samples, chunk_size, generator, score).nll


def bits_per_dim(nats: torch.Tensor | float, dim: int) -> torch.Tensor | float:
    """nats / (D ln 2): a negative log-likelihood of D dimensions in bits per dimension.

    >>> round(bits_per_dim(100.0, 784), 4)
    0.184
    """
    return nats / (dim * math.log(2.0))
