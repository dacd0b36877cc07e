"""A VAE whose posterior is a diagonal Gaussian pushed through an optional normalizing flow.

    z₀ ~ N(μ(x), diag σ(x)²),  z_K = flow(z₀, h(x)),  log q(z_K|x) = log N(z₀) - Σ log|det J|

The model returns log-densities, not losses; :mod:`flowvae.objectives` turns them into the ELBO,
the IWAE bound and -log p(x).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributions as D
from torch import nn

from flowvae.distributions import FlowDistribution, diagonal_gaussian, standard_normal_log_prob
from flowvae.flows import Flow, build_flow
from flowvae.models import networks
from flowvae.models.base import LatentVariableModel, LogDensities, Noise, as_noise, sample_prior
from flowvae.models.likelihoods import Likelihood, build_likelihood
from flowvae.numerics import at_least_float32, soft_bound, soft_clamp


def as_unit_interval(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Images as ``dtype`` in [0, 1]: 8-bit (integer) pixels are divided by 255, float data pass as they are."""
    return x.to(dtype) if x.is_floating_point() else x.to(dtype) / 255.0


class GaussianEncoder(nn.Module):
    """Wraps any body x -> h (B, feature_dim) with linear heads for μ and log σ (soft-clamped to ±8,
    or with ``log_var_bounds`` (low, high) the log-variance 2 log σ soft-bounded to (low, high)).

    forward(x) -> (mean (B, D), log_std (B, D), h (B, feature_dim)); h is the flows' context.
    """

    def __init__(
        self, body: nn.Module, feature_dim: int, latent_dim: int, log_var_bounds: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        self.body, self.feature_dim, self.latent_dim = body, feature_dim, latent_dim
        self.log_var_bounds = log_var_bounds
        self.mean = nn.Linear(feature_dim, latent_dim)
        self.log_std = nn.Linear(feature_dim, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mean(h), bounded_log_std(self.log_std(h), self.log_var_bounds), h


def bounded_log_std(raw: torch.Tensor, log_var_bounds: tuple[float, float] | None = None) -> torch.Tensor:
    """log σ from a network's raw output: soft-clamped to ±8, or log σ² soft-bounded to ``log_var_bounds``."""
    if log_var_bounds is None:
        return soft_clamp(raw, 8.0)
    return 0.5 * soft_bound(2 * raw, *log_var_bounds)


class VAE(LatentVariableModel[FlowDistribution]):
    """Encoder, optional posterior flow, a prior (N(0, I) by default) and a decoder with its likelihood.

    Args:
        encoder: x (B, C, H, W) -> (mean, log_std, h), e.g. a :class:`GaussianEncoder`.
        decoder: z (N, D) -> likelihood parameters (N, P·C, H, W).
        likelihood: a :class:`~flowvae.models.likelihoods.Likelihood`.
        latent_dim: D.
        image_shape: (C, H, W), used by :meth:`sample` and input checks.
        flow: a :class:`~flowvae.flows.Flow` over (…, D), conditioned on h if it has a context_dim.
        prior: a module with ``log_prob(z)`` (…, D) -> (…) and ``sample(n, generator)`` (see
            :mod:`flowvae.priors`); None is N(0, I).

    Examples:
        >>> import torch
        >>> from flowvae.models import build_vae
        >>> vae = build_vae("mlp", (1, 8, 8), latent_dim=4, hidden=32, flow="iaf", flow_steps=2)
        >>> x = torch.bernoulli(torch.full((10, 1, 8, 8), 0.5))
        >>> ld = vae(x, samples=3)               # LogDensities, each (K, B)
        >>> tuple(ld.log_weight.shape), tuple(ld.latents["z"].shape)
        ((3, 10), (3, 10, 4))
        >>> vae.sample(6).shape                  # images from the prior
        torch.Size([6, 1, 8, 8])
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        latent_dim: int,
        image_shape: Sequence[int],
        flow: Flow | None = None,
        prior: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.decoder, self.flow, self.prior = encoder, decoder, flow, prior
        self.likelihood, self.latent_dim, self.image_shape = likelihood, latent_dim, tuple(image_shape)

    def noise_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"z": (self.latent_dim,)}

    def posterior(self, x: torch.Tensor) -> FlowDistribution:
        """q(z_K | x) for x (B, C, H, W)."""
        self.check_input(x)
        if not x.is_floating_point():  # 8-bit pixels enter the encoder scaled to [0, 1]
            x = as_unit_interval(x, next(self.encoder.parameters()).dtype)
        mean, log_std, h = self.encoder(x)
        return FlowDistribution(diagonal_gaussian(mean, log_std), self.flow, h)

    def encode(self, x: torch.Tensor) -> FlowDistribution:
        return self.posterior(x)

    def gaussian_parameters(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's base Gaussian q(z₀|x): (mean, log_std), each (B, D) (the VampPrior's components)."""
        mean, log_std, _ = self.encoder(as_unit_interval(x, self.dtype))
        return mean, log_std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) -> likelihood parameters (..., P·C, H, W)."""
        params = self.decoder(z.reshape(-1, self.latent_dim))
        return params.reshape(*z.shape[:-1], *params.shape[1:])

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z), (…, D) -> (…)."""
        return standard_normal_log_prob(z) if self.prior is None else self.prior.log_prob(z)

    def log_densities(
        self, x: torch.Tensor, encoded: FlowDistribution, samples: int = 1, noise: Noise | torch.Tensor | None = None
    ) -> LogDensities:
        """Draw ``samples`` z_K ~ q(z|x) and score them; every field is (samples, B).

        ``noise`` {"z": (samples, B, D)} standard normal fixes the draw (z₀ = μ + σ ε).
        """
        noise = as_noise(self, noise)
        z, log_q = encoded.rsample_and_log_prob((samples,), None if noise is None else noise["z"])
        # Under autocast the networks may run in 16 bits; the densities are summed in at least float32.
        params, z, log_q = (at_least_float32(t) for t in (self.decode(z), z, log_q))
        log_px = self.likelihood.log_prob(params, self.likelihood.prepare(x, dtype=params.dtype))
        return LogDensities(log_px, at_least_float32(self.log_prior(z)), log_q, {"z": z})

    def path_gradient_problem(self) -> str | None:
        return None if self.flow is None else f"the {type(self.flow).__name__} flow posterior"

    def path_log_densities(
        self, x: torch.Tensor, encoded: FlowDistribution, samples: int = 1, noise: Noise | torch.Tensor | None = None
    ) -> LogDensities:
        """:meth:`log_densities` with log q(z|x) = log N(z; sg(μ), sg(σ)²): the gradient of log q
        reaches μ and σ along z = μ + σ ε only (the path derivative; Roeder et al. 2017)."""
        if self.flow is not None:
            raise ValueError(f"path gradients are not implemented for {self.path_gradient_problem()}")
        noise = as_noise(self, noise)
        mean, std = encoded.base.mean, encoded.base.stddev
        eps = torch.randn(samples, *mean.shape, device=mean.device, dtype=mean.dtype) if noise is None else noise["z"]
        z = at_least_float32(mean + std * eps)  # every use of the sample derives from z
        frozen = D.Independent(D.Normal(mean.detach(), std.detach(), validate_args=False), 1, validate_args=False)
        log_q = at_least_float32(frozen.log_prob(z))
        params = at_least_float32(self.decode(z))
        log_px = self.likelihood.log_prob(params, self.likelihood.prepare(x, dtype=params.dtype))
        return LogDensities(log_px, at_least_float32(self.log_prior(z)), log_q, {"z": z})

    def init_output_bias(self, mean_image: torch.Tensor) -> None:
        dense = self.decoder if isinstance(self.decoder, networks.MLPDecoder) else None
        if dense is None:  # a configuration problem (a one-line error), not a programming one
            raise ValueError(
                f"the {type(self.decoder).__name__} has no dense output layer whose bias could start at "
                "the data mean; use --arch mlp or ladder"
            )
        with torch.no_grad():
            dense.output.bias.copy_(self.likelihood.params_for_mean(mean_image).flatten())

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, H, W): the likelihood's mean at z ~ p(z)."""
        ref = next(self.parameters())
        z = sample_prior(self.prior, n, (self.latent_dim,), ref, generator)
        return self.likelihood.mean(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean reconstruction of x from one posterior sample, (B, C, H, W)."""
        z = self.posterior(x).rsample()
        return self.likelihood.mean(self.decode(z))


def build_vae(
    arch: str,
    image_shape: Sequence[int],
    latent_dim: int,
    likelihood: str | Likelihood = "bernoulli",
    hidden: int = 300,
    feature_dim: int = 256,
    flow: str = "none",
    flow_steps: int = 4,
    flow_hidden: int = 320,
    reflections: int = 8,
    rank: int | None = None,
    data_kind: str = "binary",
    flow_context: bool = True,
    prior: nn.Module | None = None,
    activation: str = "elu",
    dropout: float = 0.0,
    log_var_bounds: tuple[float, float] | None = None,
) -> VAE:
    """A ready VAE: 'mlp' (784-300-300-z as in Rezende & Mohamed), 'conv', or 'gated' (van den Berg et al.).

    Flows named as in :func:`flowvae.flows.build_flow`.  With ``flow_context`` (the default) they
    are conditioned on the encoder's h: planar, radial, Householder and Sylvester parameters come
    from h (amortized), IAF/MAF/coupling networks read h.  Without it, every flow has global
    parameters shared by all data points (as in pythae's and normflows' VAEs).  ``activation``
    ('elu' or 'gated') and ``dropout`` shape the MLP's hidden layers; ``log_var_bounds`` (low, high)
    soft-bounds the posterior's log-variance (see :class:`GaussianEncoder`).
    """
    if arch not in ("mlp", "conv", "gated"):
        raise ValueError(f"unknown single-latent architecture {arch!r}; choose one of mlp, conv, gated")
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    image_shape = tuple(image_shape)
    lik = build_likelihood(likelihood, data_kind) if isinstance(likelihood, str) else likelihood
    per_pixel = lik.params_per_pixel
    if arch != "mlp" and (activation != "elu" or dropout > 0):
        raise ValueError(f"activation and dropout apply to the MLP networks (arch mlp or ladder), not arch {arch!r}")
    if arch == "mlp":
        body = networks.MLPEncoder(image_shape, (hidden, hidden), activation, dropout)
        decoder = networks.MLPDecoder(latent_dim, image_shape, per_pixel, (hidden, hidden), activation, dropout)
    elif arch == "conv":
        body = networks.ConvEncoder(image_shape, feature_dim)
        decoder = networks.ConvDecoder(latent_dim, image_shape, per_pixel)
    else:
        body = networks.GatedConvEncoder(image_shape, feature_dim)
        decoder = networks.GatedConvDecoder(latent_dim, image_shape, per_pixel)
    encoder = GaussianEncoder(body, body.feature_dim, latent_dim, log_var_bounds)
    context_dim = body.feature_dim if flow_context else None
    posterior_flow = (
        None
        if flow == "none"
        else build_flow(flow, latent_dim, flow_steps, context_dim, flow_hidden, reflections, rank)
    )
    return VAE(encoder, decoder, lik, latent_dim, image_shape, posterior_flow, prior)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
