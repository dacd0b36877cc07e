"""Priors p(z) over a model's latents: the fixed N(0, I), a flow prior and the VampPrior.

Every prior is an ``nn.Module`` with the same small contract (:class:`Prior`):

    log_p = prior.log_prob(z)        # z (*batch, *event) -> (*batch), exact, in at least float32
    z = prior.sample(n)              # (n, *event), without gradients
    prior.closed_form_kl             # False: KL(q ‖ p) can only be estimated by Monte Carlo

:class:`StandardNormalPrior` is the default and changes nothing.  :class:`FlowPrior` pushes N(0, I)
through a flow and scores z with *one* network pass in the density direction (MAF, coupling, Glow
steps; Papamakarios et al. 2017, Chen et al. 2017).  :class:`VampPrior` is the mixture of the
model's own Gaussian posteriors at K learned pseudo-inputs (Tomczak & Welling 2018).
:func:`build_prior` builds one by name.

References:
    Papamakarios, Pavlakou & Murray (2017). Masked Autoregressive Flow for Density Estimation.
    Chen, Kingma, Salimans, Duan, Dhariwal, Schulman, Sutskever & Abbeel (2017). Variational
    Lossy Autoencoder (an autoregressive flow prior, scored in one pass).
    Kingma & Dhariwal (2018). Glow: Generative Flow with Invertible 1x1 Convolutions.
    Tomczak & Welling (2018). VAE with a VampPrior. AISTATS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from flowvae.distributions import LOG_2PI, standard_normal_log_prob
from flowvae.flows.autoregressive import MAF
from flowvae.flows.base import Compose, Flow, Inverse
from flowvae.flows.glow import ActNorm, AffineCoupling, InvertibleConv1x1
from flowvae.numerics import at_least_float32

PRIOR_NAMES = ("standard", "flow", "vamp")
FLOW_PRIOR_NAMES = ("maf", "coupling", "glow")

Encode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _event_shape(event_shape: int | Sequence[int]) -> tuple[int, ...]:
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
        self.event_shape: tuple[int, ...] = _event_shape(event_shape)
        # Carries the prior's device and dtype for sampling; not saved, so checkpoints do not change.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def _check(self, z: torch.Tensor) -> None:
        name, n = type(self).__name__, len(self.event_shape)
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"{name}.log_prob expects a floating-point tensor, got {type(z).__name__}")
        if z.dim() < n or tuple(z.shape[z.dim() - n:]) != self.event_shape:
            raise ValueError(f"{name} expects z of shape (*batch, {', '.join(map(str, self.event_shape))}), "
                             f"got {tuple(z.shape)}")

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Exact log p(z): z (*batch, *event) -> (*batch).

        Computed with autocast off and z in at least float32 (16-bit z is promoted), so that the
        density is never summed in 16 bits.
        """
        self._check(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._log_prob(at_least_float32(z))

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


def has_one_pass_density(flow: Flow) -> bool:
    """Whether ``flow.inverse`` (z → u, the density direction) costs one network pass.

    MAF, coupling, ActNorm, invertible 1x1 convolutions, permutations, and any flow with an
    inverse that is not autoregressive are one pass; IAF's inverse takes D passes (one per
    degree), and planar and Sylvester flows have no inverse.  ``Inverse(f)`` is one pass when f's
    forward is (so ``Inverse(IAF(...))`` qualifies), and a ``Compose`` when all its steps are.
    """
    return _not_one_pass(flow, density=True) is None


def _not_one_pass(flow: Flow, density: bool) -> str | None:
    """The name of the first step of ``flow`` that takes more than one pass in that direction, or None."""
    if isinstance(flow, Compose):
        return next((name for f in flow.flows if (name := _not_one_pass(f, density)) is not None), None)
    if isinstance(flow, Inverse):
        inner = _not_one_pass(flow.flow, not density)
        return None if inner is None else f"Inverse({inner})"
    if density and not flow.has_inverse:
        return type(flow).__name__
    conditioned_on_output = getattr(flow, "conditioned_on_output", None)  # IAF and MAF declare it
    if isinstance(conditioned_on_output, bool) and conditioned_on_output != density:
        return type(flow).__name__
    return None


class FlowPrior(Prior):
    """p(z) of z = f(u), u ~ N(0, I), for an unconditional flow f (Chen et al. 2017's flow prior).

        log p(z) = log N(u; 0, I) + log |det ∂u/∂z|,   u = f⁻¹(z)

    is one pass of ``flow.inverse`` (the density direction), which must therefore be cheap: MAF
    (Papamakarios et al. 2017), affine coupling, or Glow steps (ActNorm, invertible 1x1
    convolution, coupling) for spatial latents; see :func:`has_one_pass_density`.  Sampling runs
    ``flow`` forward (for MAF, D sequential passes).  ActNorm layers are marked initialised and
    start as the identity: their data-dependent initialisation would otherwise run on the base
    noise of the first ``sample`` call.

    Args:
        event_shape: ``(D,)`` or ``(C, H, W)``, matching ``flow.event_dim``.
        flow: a :class:`~flowvae.flows.Flow` without context, with a one-pass inverse.

    >>> prior = FlowPrior((3,), Compose(MAF(3, (8, 8)), MAF(3, (8, 8), order="reversed")))
    >>> prior.log_prob(prior.sample(4)).shape
    torch.Size([4])
    """

    closed_form_kl = False

    def __init__(self, event_shape: int | Sequence[int], flow: Flow) -> None:
        super().__init__(event_shape)
        if not isinstance(flow, Flow):
            raise TypeError(f"FlowPrior needs a flowvae Flow, got {type(flow).__name__}")
        if flow.event_dim != len(self.event_shape):
            raise ValueError(f"FlowPrior over event_shape {self.event_shape} needs a flow with event_dim "
                             f"{len(self.event_shape)}, got event_dim {flow.event_dim}")
        if flow.context_dim is not None:
            raise ValueError(f"a prior is unconditional, but the flow was built with context_dim={flow.context_dim}")
        offender = _not_one_pass(flow, density=True)
        if offender is not None:
            raise ValueError(f"FlowPrior needs a flow whose inverse (density direction) is one pass, such as "
                             f"MAF, coupling or Glow steps; {offender} is not")
        for module in flow.modules():
            if isinstance(module, ActNorm):
                module.initialized.fill_(True)
        self.flow = flow

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        u, log_abs_det = self.flow.inverse(z)
        return standard_normal_log_prob(u.flatten(u.dim() - len(self.event_shape))) + log_abs_det

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        return self.flow(self._randn(n, *self.event_shape, generator=generator))[0]


def build_flow_prior(event_shape: int | Sequence[int], flow: str | None = None, steps: int = 4,
                     hidden: int = 320) -> FlowPrior:
    """A :class:`FlowPrior` of ``steps`` steps of one family.

    Vectors ``(D,)``: ``flow='maf'`` (the default; MADEs with two hidden layers of ``hidden``
    units, orderings alternating natural/reversed) or ``'coupling'`` (affine coupling, MLP
    conditioner, halves alternating).  Spatial latents ``(C, H, W)``: ``'glow'`` (the default),
    steps of ActNorm, invertible 1x1 convolution and affine coupling with a ``hidden``-channel
    conv net, halves alternating.  Every step starts at (or near) the identity, so the prior starts
    at (or near) N(0, I).
    """
    shape = _event_shape(event_shape)
    if len(shape) not in (1, 3):
        raise ValueError(f"a flow prior needs event_shape (D,) or (C, H, W), got {shape}")
    spatial = len(shape) == 3
    flow = ("glow" if spatial else "maf") if flow is None else flow
    if flow not in FLOW_PRIOR_NAMES:
        raise ValueError(f"flow prior {flow!r} must be one of {', '.join(FLOW_PRIOR_NAMES)} "
                         "(families whose density direction is one pass; IAF, planar, radial and Sylvester are not)")
    if (flow == "glow") != spatial:
        raise ValueError(f"flow prior {flow!r} does not fit event_shape {shape}: use 'maf' or 'coupling' for "
                         "vectors (D,) and 'glow' for spatial latents (C, H, W)")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"a flow prior needs steps >= 1, got {steps!r}")
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"a flow prior needs hidden >= 1, got {hidden!r}")
    channels = shape[0]
    if flow in ("coupling", "glow") and channels < 2:
        raise ValueError(f"a {flow} prior splits {'channels' if spatial else 'features'} in two and needs at least 2, "
                         f"got event_shape {shape}")
    if flow == "maf":
        parts: list[Flow] = [MAF(channels, (hidden, hidden), order="natural" if k % 2 == 0 else "reversed")
                             for k in range(steps)]
    elif flow == "coupling":
        parts = [AffineCoupling(channels, hidden, event_dim=1, swap=k % 2 == 1) for k in range(steps)]
    else:
        parts = []
        for k in range(steps):
            parts += [ActNorm(channels), InvertibleConv1x1(channels),
                      AffineCoupling(channels, hidden, event_dim=3, swap=k % 2 == 1)]
    return FlowPrior(shape, Compose(parts))


def gaussian_mixture_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor,
                              max_block: int = 2 ** 22) -> torch.Tensor:
    """log (1/K) Σ_k N(z; μ_k, diag σ_k²) for z (*batch, D), mean and log_std (K, D) -> (*batch).

    With P_k = σ_k⁻² and everything centred on c = mean_k μ_k,

        (z − μ_k)ᵀ diag(P_k) (z − μ_k) = (z²)·P_k − 2 z·(μ_k P_k) + (μ_k²)·P_k,

    so the N × K quadratic forms are two matmuls and the (N, K, D) differences are never
    materialised.  Because the expanded form cancels (its terms grow like ‖z − c‖²/σ²), it is
    computed in float64 and the result returned in z's dtype (at least float32).  Rows of z are
    taken ``max_block // K`` at a time so that no N × K block exceeds ``max_block`` entries.
    """
    if mean.dim() != 2 or mean.shape != log_std.shape or z.shape[-1] != mean.shape[-1]:
        raise ValueError(f"gaussian_mixture_log_prob needs z (..., D) with mean and log_std (K, D), got "
                         f"{tuple(z.shape)}, {tuple(mean.shape)} and {tuple(log_std.shape)}")
    out_dtype = at_least_float32(z).dtype
    k, d = mean.shape
    mean, log_std = mean.double(), log_std.double()
    centre = mean.mean(0)
    mean = mean - centre
    precision = torch.exp(-2.0 * log_std)                                                # (K, D)
    scaled_mean = mean * precision                                                      # (K, D)
    # log N(z; μ_k, σ_k²) = −½ quad − Σ log σ_k − (D/2) log 2π − log K, all but quad per component
    constant = -0.5 * (mean * scaled_mean).sum(-1) - log_std.sum(-1) - 0.5 * d * LOG_2PI - math.log(k)  # (K,)
    flat = z.reshape(-1, d).double() - centre
    rows = max(1, max_block // k)
    parts = []
    for block in flat.split(rows):
        quad = (block * block) @ precision.T - 2.0 * (block @ scaled_mean.T)             # (N, K)
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
    """

    closed_form_kl = False

    def __init__(self, n_pseudo: int, image_shape: Sequence[int], encode: Encode,
                 pseudo_init: torch.Tensor | None = None, *, latent_dim: int) -> None:
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
            if (not isinstance(pseudo_init, torch.Tensor) or not pseudo_init.is_floating_point()
                    or tuple(pseudo_init.shape) != (n_pseudo, *image_shape)):
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
            raise ValueError(f"VampPrior's encode must return mean and log_std of shape {expected}, got "
                             f"{tuple(mean.shape)} and {tuple(log_std.shape)}")
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


def build_prior(name: str, event_shape: int | Sequence[int], *, flow: str | None = None, steps: int = 4,
                hidden: int = 320, n_pseudo: int = 500, image_shape: Sequence[int] | None = None,
                encode: Encode | None = None, pseudo_init: torch.Tensor | None = None) -> Prior:
    """The prior called ``name`` (one of :data:`PRIOR_NAMES`) over ``event_shape``.

    'standard': N(0, I).  'flow': :func:`build_flow_prior` with ``flow``, ``steps``, ``hidden``.
    'vamp': :class:`VampPrior` with ``n_pseudo`` pseudo-inputs of ``image_shape`` scored by
    ``encode``; it needs vector latents (D,).

    Returns:
        A :class:`Prior`: ``log_prob(z)`` (…, D) -> (…) and ``sample(n, generator)``.

    Examples:
        >>> import torch
        >>> prior = build_prior("flow", (4,), flow="maf", steps=2, hidden=16)
        >>> prior.log_prob(torch.randn(10, 4)).shape, prior.sample(3).shape
        (torch.Size([10]), torch.Size([3, 4]))
    """
    if name not in PRIOR_NAMES:
        raise ValueError(f"unknown prior {name!r}; choose one of {', '.join(PRIOR_NAMES)}")
    if name == "standard":
        return StandardNormalPrior(event_shape)
    if name == "flow":
        return build_flow_prior(event_shape, flow, steps, hidden)
    shape = _event_shape(event_shape)
    if len(shape) != 1:
        raise ValueError(f"the vamp prior needs vector latents (D,), got event_shape {shape}")
    if image_shape is None or encode is None:
        raise ValueError("the vamp prior needs image_shape and encode (the model's Gaussian encoder)")
    return VampPrior(n_pseudo, image_shape, encode, pseudo_init, latent_dim=shape[0])
