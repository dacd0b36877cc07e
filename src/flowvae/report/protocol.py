"""What the figures need from a model, as protocols (any object with these members will do; it need
not subclass a flowvae model): the manifold needs :class:`DecodesLatents`, the posterior figures
:class:`HasPosterior`.  flowvae's single-latent VAEs (``--arch mlp``, ``conv``, ``gated``) are both."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from flowvae.distributions import FlowDistribution
from flowvae.models.likelihoods import Likelihood


class DecodesLatents(Protocol):
    """A model with one vector latent z of ``latent_dim`` units: ``decode(z)`` (N, D) gives the
    parameters of p(x|z), which ``likelihood`` scores (``prepare``, ``log_prob``) and averages (``mean``)."""

    latent_dim: int
    likelihood: Likelihood

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters for latents ``z`` (N, latent_dim)."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        """The weights (the first one tells the figures the model's device and dtype)."""
        ...


class HasPosterior(DecodesLatents, Protocol):
    """A :class:`DecodesLatents` with its approximate posterior q(z|x): a base Gaussian, maybe pushed
    through a flow conditioned on the encoder's h."""

    def posterior(self, x: torch.Tensor) -> FlowDistribution:
        """q(z|x) for images ``x`` (B, C, H, W)."""
        ...
