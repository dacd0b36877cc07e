"""The VampPrior (Tomczak & Welling 2018): a mixture of the model's own Gaussian posteriors at
learned pseudo-inputs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from flowvae.distributions import LOG_2PI
from flowvae.numerics import at_least_float32
from flowvae.priors.base import Prior

Encode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def gaussian_mixture_log_prob(
    z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, max_block: int = 2**22
) -> torch.Tensor:
    """log (1/K) Σ_k N(z; μ_k, diag σ_k²) for z (*batch, D), mean and log_std (K, D) -> (*batch).

    With P_k = σ_k⁻² and everything centred on c = mean_k μ_k,

        (z − μ_k)ᵀ diag(P_k) (z − μ_k) = (z²)·P_k − 2 z·(μ_k P_k) + (μ_k²)·P_k,

    so the N × K quadratic forms are two matmuls and the (N, K, D) differences are never
    materialised.  Because the expanded form cancels (its terms grow like ‖z − c‖²/σ²), it is
    computed in float64 and the result returned in z's dtype (at least float32).  Rows of z are
    taken ``max_block // K`` at a time so that no N × K block exceeds ``max_block`` entries.
    """
    if mean.dim() != 2 or mean.shape != log_std.shape or z.shape[-1] != mean.shape[-1]:
        raise ValueError(
            f"gaussian_mixture_log_prob needs z (..., D) with mean and log_std (K, D), got "
            f"{tuple(z.shape)}, {tuple(mean.shape)} and {tuple(log_std.shape)}"
        )
    out_dtype = at_least_float32(z).dtype
    k, d = mean.shape
    mean, log_std = mean.double(), log_std.double()
    centre = mean.mean(0)
    mean = mean - centre
    precision = torch.exp(-2.0 * log_std)  # (K, D)
    scaled_mean = mean * precision  # (K, D)
    # log N(z; μ_k, σ_k²) = −½ quad − Σ log σ_k − (D/2) log 2π − log K, all but quad per component
    constant = -0.5 * (mean * scaled_mean).sum(-1) - log_std.sum(-1) - 0.5 * d * LOG_2PI - math.log(k)  # (K,)
    flat = z.reshape(-1, d).double() - centre
    rows = max(1, max_block // k)
    parts = []
    for block in flat.split(rows):
        quad = (block * block) @ precision.T - 2.0 * (block @ scaled_mean.T)  # (N, K)
        parts.append(torch.logsumexp(constant - 0.5 * quad, dim=-1))
    log_p = torch.cat(parts) if parts else flat.new_zeros(0)
    return log_p.reshape(z.shape[:-1]).to(out_dtype)


class VampPrior(Prior):
    """The VampPrior p(z) = (1/K) Σ_k N(z; μ(u_k), diag σ(u_k)²) (Tomczak & Welling 2018).

    The K pseudo-inputs u_k (``n_pseudo``, 500 in the paper) are images learned with the model,
    kept in the data's range [0, 1] as u = sigmoid(ℓ) of unconstrained logits ℓ (a sigmoid rather
    than the paper's hardtanh, so no pseudo-pixel loses its gradient at the boundary).
    ``encode`` is the model's Gaussian encoder, u (K, C, H, W) -> (mean (K, D), log_std (K, D)); it
    runs on all pseudo-inputs at every ``log_prob`` and ``sample`` call (no caching).  It is kept
    outside the module tree: the state dict holds only the logits, ``.to()`` and ``.parameters()``
    leave the encoder to the model that owns it.  Pass the encoder module itself or a bound
    method of the model, so that ``copy.deepcopy`` of the model keeps the link (a lambda would
    still point at the original encoder).

    With a flow posterior q(z_K|x) the mixture is over the encoder's *base* Gaussians
    q(z₀|u_k) — still a proper density over z, only not the aggregate of the flow posteriors.

    ``log_prob`` handles z (*batch, D) of any batch shape, e.g. (K_samples, B, D), in one batched
    computation against all components (:func:`gaussian_mixture_log_prob`).  ``sample`` picks a
    component uniformly and draws from its Gaussian.

    Args:
        n_pseudo: number of pseudo-inputs K.
        image_shape: (C, H, W) of the data.
        encode: u (K, C, H, W) -> (mean (K, D), log_std (K, D)).
        pseudo_init: optional initial pseudo-inputs (K, C, H, W) in [0, 1], e.g. K training images
            (clipped to [1e-3, 1 − 1e-3] before the logit); by default logits ~ N(0, 1).
        latent_dim: D.

    Examples:
        >>> import torch
        >>> from flowvae.models import build_vae
        >>> vae = build_vae("mlp", (1, 8, 8), latent_dim=2, hidden=16)
        >>> prior = VampPrior(10, (1, 8, 8), vae.gaussian_parameters, latent_dim=2)
        >>> prior.log_prob(torch.zeros(5, 2)).shape, prior.sample(3).shape
        (torch.Size([5]), torch.Size([3, 2]))
    """

    closed_form_kl = False

    def __init__(
        self,
        n_pseudo: int,
        image_shape: Sequence[int],
        encode: Encode,
        pseudo_init: torch.Tensor | None = None,
        *,
        latent_dim: int,
    ) -> None:
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"VampPrior needs latent_dim >= 1, got {latent_dim!r}")
        super().__init__((latent_dim,))
        if not isinstance(n_pseudo, int) or n_pseudo < 1:
            raise ValueError(f"VampPrior needs n_pseudo >= 1, got {n_pseudo!r}")
        image_shape = tuple(image_shape)
        if len(image_shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in image_shape):
            raise ValueError(f"VampPrior needs image_shape (C, H, W), got {image_shape}")
        if not callable(encode):
            raise TypeError(f"VampPrior needs a callable encode, got {type(encode).__name__}")
        if pseudo_init is None:
            logits = torch.randn(n_pseudo, *image_shape)
        else:
            if (
                not isinstance(pseudo_init, torch.Tensor)
                or not pseudo_init.is_floating_point()
                or tuple(pseudo_init.shape) != (n_pseudo, *image_shape)
            ):
                got = tuple(pseudo_init.shape) if isinstance(pseudo_init, torch.Tensor) else type(pseudo_init).__name__
                raise ValueError(f"pseudo_init must be a float tensor of shape {(n_pseudo, *image_shape)}, got {got}")
            if pseudo_init.min() < 0 or pseudo_init.max() > 1:
                raise ValueError("pseudo_init must hold values in [0, 1], the data's range")
            logits = torch.logit(pseudo_init.detach().float().clamp(1e-3, 1 - 1e-3)).cpu()
        self.n_pseudo, self.image_shape = n_pseudo, image_shape
        self.pseudo_logits = nn.Parameter(logits)
        object.__setattr__(self, "_encode", encode)  # not a submodule: the encoder belongs to the model

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """The pseudo-inputs u = sigmoid(ℓ), (K, C, H, W) in (0, 1)."""
        return torch.sigmoid(self.pseudo_logits)

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's means and log-standard-deviations, each (K, D): the encoder at the pseudo-inputs."""
        out = self._encode(self.pseudo_inputs)
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError("VampPrior's encode must return (mean, log_std)")
        mean, log_std = out
        expected = (self.n_pseudo, self.event_shape[0])
        if tuple(mean.shape) != expected or tuple(log_std.shape) != expected:
            raise ValueError(
                f"VampPrior's encode must return mean and log_std of shape {expected}, got "
                f"{tuple(mean.shape)} and {tuple(log_std.shape)}"
            )
        return mean, log_std

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        mean, log_std = self.components()
        return gaussian_mixture_log_prob(z, mean, log_std)

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        mean, log_std = self.components()
        device = self.pseudo_logits.device
        index = torch.randint(self.n_pseudo, (n,), generator=generator, device=device)
        noise = torch.randn(n, self.event_shape[0], generator=generator, device=device, dtype=mean.dtype)
        return mean[index] + torch.exp(log_std[index]) * noise

    def extra_repr(self) -> str:
        return f"n_pseudo={self.n_pseudo}, image_shape={self.image_shape}, latent_dim={self.event_shape[0]}"
