"""Base distributions and the distribution of a flow-transformed sample, on top of torch.distributions."""

from __future__ import annotations

import math

import torch
from torch import distributions as D
from torch import nn

from flowvae.flows.base import Flow

LOG_2PI = math.log(2.0 * math.pi)


def diagonal_gaussian(mean: torch.Tensor, log_std: torch.Tensor) -> D.Independent:
    """N(mean, diag(exp(log_std))²) as a torch distribution with event shape (D,).

    Argument validation is off: it costs a device sync per call on the training hot path.
    """
    return D.Independent(D.Normal(mean, torch.exp(log_std), validate_args=False), 1, validate_args=False)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last axis: (..., D) -> (...)."""
    return -0.5 * (z * z + LOG_2PI).sum(-1)


class StandardNormal(nn.Module):
    """N(0, I) over ``shape``; a module so that ``.to(device)`` moves it with the model."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(shape), persistent=False)

    def distribution(self) -> D.Independent:
        return D.Independent(D.Normal(self.loc, torch.ones_like(self.loc)), self.loc.dim())

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.distribution().log_prob(z)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        return self.distribution().sample(sample_shape)


class FlowDistribution:
    """q(z_K) for z_K = flow(z₀, h), z₀ ~ base:  log q(z_K) = log base(z₀) - log|det ∂z_K/∂z₀|.

    ``base`` is any torch distribution (e.g. :func:`diagonal_gaussian` from an encoder);
    ``rsample_and_log_prob`` is the one-pass path used by VAEs; ``log_prob`` needs an inverse.
    """

    def __init__(self, base: D.Distribution, flow: Flow | None = None, context: torch.Tensor | None = None) -> None:
        self.base, self.flow, self.context = base, flow, context

    def rsample_and_log_prob(self, sample_shape: torch.Size | tuple[int, ...] = (), noise: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """z_K and log q(z_K), (*sample_shape, *batch, D) and (*sample_shape, *batch).

        ``noise`` ε (standard normal, of z's shape) fixes the draw of a location-scale base:
        z₀ = mean + stddev · ε; without it the base's own ``rsample`` draws.
        """
        z0 = self.base.rsample(sample_shape) if noise is None else self.base.mean + self.base.stddev * noise
        log_q = self.base.log_prob(z0)
        if self.flow is None:
            return z0, log_q
        z, ladj = self.flow(z0, self.context)
        return z, log_q - ladj

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        if self.flow is None:
            return self.base.log_prob(z)
        z0, ladj_inverse = self.flow.inverse(z, self.context)
        return self.base.log_prob(z0) + ladj_inverse
