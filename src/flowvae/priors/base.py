"""The prior contract (:class:`Prior`) and the fixed N(0, I) prior."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flowvae.distributions import standard_normal_log_prob
from flowvae.numerics import at_least_float32


def as_event_shape(event_shape: int | Sequence[int]) -> tuple[int, ...]:
    """``event_shape`` as a non-empty tuple of positive ints (an int ``D`` is ``(D,)``)."""
    shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
    if not shape or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"event_shape must be a non-empty tuple of positive ints, got {event_shape!r}")
    return shape


class Prior(nn.Module):
    """Base class of the priors p(z): shape checks, precision and the sampling entry point.

    Subclasses set ``closed_form_kl`` and implement ``_log_prob`` (z already checked and in at
    least float32, autocast off) and ``_sample``.  ``forward(z)`` is ``log_prob(z)``.

    Args:
        event_shape: shape of one latent, ``(D,)`` for vectors or ``(C, H, W)`` for spatial latents.
    """

    closed_form_kl: bool = False
    """True when KL(N(μ, diag σ²) ‖ p) has a closed form; False means KL figures are Monte Carlo."""

    def __init__(self, event_shape: int | Sequence[int]) -> None:
        super().__init__()
        self.event_shape: tuple[int, ...] = as_event_shape(event_shape)
        # Carries the prior's device and dtype for sampling; not saved, so checkpoints do not change.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def _check(self, z: torch.Tensor) -> None:
        name, n = type(self).__name__, len(self.event_shape)
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"{name}.log_prob expects a floating-point tensor, got {type(z).__name__}")
        if z.dim() < n or tuple(z.shape[z.dim() - n :]) != self.event_shape:
            raise ValueError(
                f"{name} expects z of shape (*batch, {', '.join(map(str, self.event_shape))}), got {tuple(z.shape)}"
            )

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Exact log p(z): z (*batch, *event) -> (*batch).

        Computed with autocast off and z in at least float32 (16-bit z is promoted), so that the
        density is never summed in 16 bits.
        """
        self._check(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._log_prob(at_least_float32(z))

    def log_prob_per_channel(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) split over the channel axis of a spatial latent: z (*batch, C, H, W) -> (*batch, C),
        summing to :meth:`log_prob`.  By default each channel gets an equal share; a prior that
        factorises over channels (:class:`~flowvae.priors.DiagonalGaussianPrior`) splits it exactly."""
        return split_equally(self.log_prob(z), z.shape[-3])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.log_prob(z)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws z ~ p(z), (n, *event), in the prior's dtype and on its device (no gradient).

        ``generator`` (on the prior's device) makes the draw reproducible.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"sample needs a number of draws n >= 0, got {n!r}")
        return self._sample(n, generator)

    def _randn(self, *shape: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=self._anchor.device, dtype=self._anchor.dtype)

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}"


class StandardNormalPrior(Prior):
    """The fixed prior p(z) = N(0, I) over ``event_shape``; flowvae's default.

    KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − 2 log σ) in closed form, hence
    ``closed_form_kl = True``.  It holds no parameters and saves nothing in the state dict.

    >>> prior = StandardNormalPrior((2,))
    >>> prior.log_prob(torch.zeros(3, 2)).shape
    torch.Size([3])
    """

    closed_form_kl = True

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return standard_normal_log_prob(z.flatten(z.dim() - len(self.event_shape)))

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        return self._randn(n, *self.event_shape, generator=generator)


def split_equally(total: torch.Tensor, channels: int) -> torch.Tensor:
    """A log-density (*batch) shared equally among ``channels``: (*batch, channels)."""
    return (total / channels).unsqueeze(-1).expand(*total.shape, channels)
