"""A learned diagonal Gaussian prior over spatial latents (the ResNet VAE's top prior)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flowvae.distributions import gaussian_log_prob
from flowvae.numerics import at_least_float32, soft_clamp
from flowvae.priors.base import Prior


class DiagonalGaussianPrior(Prior):
    """p(z) = N(μ, diag σ²) over (C, H, W) with learned μ and log σ (soft-clamped to ±``log_std_bound``).

    openai/iaf computes the ResNet VAE's top prior by a convolution of the learned constant h_top,
    so it is a learned constant; here it is parameterised directly.  It factorises over channels,
    so :meth:`log_prob_per_channel` is exact (each channel is one free-bits group of the ResNet VAE).

    >>> prior = DiagonalGaussianPrior((2, 3, 3))
    >>> prior.log_prob_per_channel(prior.sample(4)).shape
    torch.Size([4, 2])
    """

    closed_form_kl = True

    def __init__(self, shape: Sequence[int], log_std_bound: float = 8.0) -> None:
        if len(shape) != 3:
            raise ValueError(f"DiagonalGaussianPrior needs a (C, H, W) shape, got {tuple(shape)}")
        super().__init__(tuple(shape))
        self.log_std_bound = log_std_bound
        self.mean = nn.Parameter(torch.zeros(self.event_shape))
        self.raw_log_std = nn.Parameter(torch.zeros(self.event_shape))

    def log_std(self) -> torch.Tensor:
        """log σ, (C, H, W), soft-clamped to ±``log_std_bound``."""
        return soft_clamp(self.raw_log_std, self.log_std_bound)

    def log_prob_per_channel(self, z: torch.Tensor) -> torch.Tensor:
        """(…, C, H, W) -> (…, C): log N(z; μ, σ²) summed over (H, W)."""
        self._check(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return gaussian_log_prob(at_least_float32(z), self.mean, self.log_std(), (-2, -1))

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(z, self.mean, self.log_std(), (-2, -1)).sum(-1)

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        eps = torch.randn(n, *self.event_shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(self.log_std()) * eps

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, log_std_bound={self.log_std_bound}"
