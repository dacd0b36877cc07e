"""An MLP ladder VAE: L stochastic layers, a top-down generative path and bidirectional inference
(Kingma et al. 2016 in MLP form; Sønderby et al. 2016), with a posterior flow per layer.

Generative model, top-down (z_L is the top layer):

    z_L ~ p(z_L)                       (N(0, I), or a learnable prior module)
    t_l = g_l(z_{l+1}),  p(z_l | z_{l+1}) = N(μ_p(t_l), σ_p(t_l)²)     for l = L-1, …, 1
    p(x | z_1, t_1)                    (the decoder also reads t_1, a skip from the layers above)

Inference: a bottom-up pass d_1 = f_1(x), d_l = f_l(d_{l-1}), then top-down, sharing the prior's
parameters (the "residual" posterior of NVAE):

    q(z_L | x) = N(μ(d_L), σ(d_L)²)
    q(z_l | x, z_{l+1}) = N(μ_p + Δμ(d_l, t_l), (σ_p · exp Δlogσ(d_l, t_l))²)

and each layer's Gaussian sample z₀ is pushed through a flow conditioned on c_l = h(d_l, t_l):
log q(z_l | ·) = log N(z₀) − log|det ∂z_l/∂z₀|.  Free bits and diagnostics see one KL group per
layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from flowvae.distributions import gaussian_log_prob, standard_normal_log_prob
from flowvae.flows import Flow, build_flow
from flowvae.models.base import BottomUp, LatentVariableModel, LogDensities, Noise, as_noise, sample_prior
from flowvae.models.likelihoods import Likelihood
from flowvae.models.networks import AutoregressivePixels, LocalAutoregression, hidden_layer, sample_autoregressively
from flowvae.models.vae import as_unit_interval, bounded_log_std
from flowvae.numerics import at_least_float32, soft_clamp

LOG_STD_BOUND = 8.0


def _dense(
    sizes: Sequence[int], last_activation: bool = True, activation: str = "elu", dropout: float = 0.0
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if last_activation or i < len(sizes) - 2:
            layers += hidden_layer(a, b, activation, dropout)
        else:
            layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class _GaussianHead(nn.Linear):
    """h -> (mean, log_std), both (…, D); ``residual`` heads start at zero (q starts at the prior)."""

    def __init__(self, features: int, latent_dim: int, residual: bool = False) -> None:
        super().__init__(features, 2 * latent_dim)
        if residual:
            with torch.no_grad():
                self.weight.mul_(1e-2)
                self.bias.zero_()

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = super().forward(h).chunk(2, dim=-1)
        return mean, log_std


def _drop_unused_contexts(module: LadderVAE, state_dict: dict, prefix: str, *args: object) -> None:
    """Earlier checkpoints hold context networks also where no flow reads them; they are ignored."""
    if len(module.contexts) == 0:
        for key in [k for k in state_dict if k.startswith(prefix + "contexts.")]:
            del state_dict[key]


class LadderVAE(LatentVariableModel[BottomUp]):
    """An MLP ladder VAE with ``layers`` stochastic layers of ``latent_dim`` units each.

    Args:
        image_shape: (C, H, W).
        likelihood: p(x | ·), e.g. ``build_likelihood("bernoulli", "binary")``.
        latent_dim: units per stochastic layer.
        layers: L ≥ 1 stochastic layers (L = 1 is a single-latent VAE whose decoder reads z only).
        hidden: width of every deterministic layer.
        flow: posterior flow family per layer (as in :func:`flowvae.flows.build_flow`), or 'none'.
        flow_steps: that flow's steps (``flow_hidden``, ``reflections``, ``rank``: its other options, as
            in :func:`flowvae.flows.build_flow`).
        flow_context: condition each layer's flow on its context c_l (else global flow parameters).
        prior: the top layer's prior (``log_prob``/``sample`` module), None for N(0, I).
        activation: every MLP's hidden layers, 'elu' or 'gated'.
        dropout: the dropout probability of every MLP's hidden layers.
        log_var_bounds: (low, high) soft bounds on the posterior's log-variance (None: log σ within ±8).
        autoregressive_decoder: hidden units of an :class:`~flowvae.models.networks.AutoregressivePixels`
            MADE that makes a Bernoulli p(x | z_1, t_1) autoregressive over the pixels (0: none).
        pixelcnn_layers: masked convolutions of a :class:`~flowvae.models.networks.LocalAutoregression`
            term that does so from a local window (0: none), with ``pixelcnn_channels`` features;
            ``pixelcnn_conditioned``: that term's last layer also reads the decoder's logits.
            With neither, the pixels are independent given the latents.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        likelihood: Likelihood,
        latent_dim: int = 32,
        layers: int = 2,
        hidden: int = 300,
        flow: str = "none",
        flow_steps: int = 1,
        flow_hidden: int = 320,
        reflections: int = 8,
        rank: int | None = None,
        flow_context: bool = True,
        prior: nn.Module | None = None,
        activation: str = "elu",
        dropout: float = 0.0,
        log_var_bounds: tuple[float, float] | None = None,
        autoregressive_decoder: int = 0,
        pixelcnn_layers: int = 0,
        pixelcnn_channels: int = 32,
        pixelcnn_conditioned: bool = False,
    ) -> None:
        super().__init__()
        if layers < 1 or latent_dim < 1 or hidden < 1:
            raise ValueError(
                f"LadderVAE needs layers, latent_dim and hidden >= 1, got {layers}, {latent_dim}, {hidden}"
            )
        self.image_shape, self.likelihood = tuple(image_shape), likelihood
        self.latent_dim, self.layers, self.prior = latent_dim, layers, prior
        self.log_var_bounds = log_var_bounds
        pixels = math.prod(self.image_shape)
        D, H = latent_dim, hidden

        def _mlp(sizes: Sequence[int], last_activation: bool = True) -> nn.Sequential:
            return _dense(sizes, last_activation, activation, dropout)

        self.bottom_up = nn.ModuleList([_mlp((pixels, H, H))] + [_mlp((H, H)) for _ in range(layers - 1)])
        self.top_posterior = _GaussianHead(H, D)
        # Index l (0-based, bottom layer 0) for the layers below the top: l = 0 … L-2.
        self.top_down = nn.ModuleList([_mlp((D, H, H)) for _ in range(layers - 1)])
        self.prior_heads = nn.ModuleList([_GaussianHead(H, D) for _ in range(layers - 1)])
        self.posterior_heads = nn.ModuleList([_GaussianHead(2 * H, D, residual=True) for _ in range(layers - 1)])
        self.has_flow = flow != "none"
        # Only what is used is built: an unused parameter gets no gradient and DDP refuses it.
        uses_context = self.has_flow and flow_context
        self.contexts = nn.ModuleList([_mlp((2 * H, H)) for _ in range(layers - 1)] if uses_context else [])
        context_dim = H if flow_context else None
        self.flows = nn.ModuleList(
            [
                build_flow(flow, D, flow_steps, context_dim, flow_hidden, reflections, rank) or nn.Identity()
                for _ in range(layers)
            ]
        )
        self._register_load_state_dict_pre_hook(_drop_unused_contexts, with_module=True)
        decoder_in = D + (H if layers > 1 else 0)
        self.decoder = _mlp((decoder_in, H, H, likelihood.params_per_pixel * pixels), last_activation=False)
        self.autoregressive = bool(autoregressive_decoder or pixelcnn_layers)
        if self.autoregressive and likelihood.name != "bernoulli":
            raise ValueError(
                f"the autoregressive decoder needs the bernoulli likelihood (binary images), not {likelihood.name!r}"
            )
        if pixelcnn_layers and self.image_shape[0] != 1:
            raise ValueError(f"the PixelCNN term reads single-channel images, not {self.image_shape[0]} channels")
        self.pixel_made = AutoregressivePixels(pixels, H, autoregressive_decoder) if autoregressive_decoder else None
        self.pixel_cnn = (
            LocalAutoregression(pixelcnn_channels, pixelcnn_layers, pixelcnn_conditioned) if pixelcnn_layers else None
        )

    def noise_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"z{l + 1}": (self.latent_dim,) for l in range(self.layers)}

    def encode(self, x: torch.Tensor) -> BottomUp:
        self.check_input(x)
        h = as_unit_interval(x, self.dtype).flatten(1)
        features = []
        for f in self.bottom_up:
            h = f(h)
            features.append(h)
        return BottomUp([(d,) for d in features])

    def top_gaussian_parameters(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z_L|x)'s base Gaussian: (mean, log_std), each (B, D) (the VampPrior's components)."""
        mean, log_std = self.top_posterior(self.encode(x).layers[-1][0])
        return mean, bounded_log_std(log_std, self.log_var_bounds)

    def _flow(self, l: int, z0: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_flow:
            return z0, z0.new_zeros(z0.shape[:-1])
        flow: Flow = self.flows[l]
        return flow(z0, context if flow.context_dim is not None else None)

    def _log_prior_top(self, z: torch.Tensor) -> torch.Tensor:
        if self.prior is None:
            return standard_normal_log_prob(z)
        return self.prior.log_prob(z)

    def _prior_step(self, l: int, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t_l and p(z_l | z_{l+1})'s (mean, log_std) for layer l < L-1."""
        t = self.top_down[l](z_above)
        mean, log_std = self.prior_heads[l](t)
        return t, mean, soft_clamp(log_std, LOG_STD_BOUND)

    def _top_down(
        self, d: list[torch.Tensor], eps: Callable[[int], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, list, list, Noise]:
        """The inference pass from the top: returns z_1, t_1 (None for one layer), per-layer log q and
        log p (top layer first, each (…)) and the latents.  ``eps(l)`` gives layer l's noise."""
        L = self.layers
        # Top layer: q(z_L | x) from the bottom-up features, scored against p(z_L).
        mean, log_std = self.top_posterior(d[L - 1])
        log_std = bounded_log_std(log_std, self.log_var_bounds)
        z0 = mean + torch.exp(log_std) * eps(L - 1)
        z, ladj = self._flow(L - 1, z0, d[L - 1])
        log_q = [at_least_float32(gaussian_log_prob(z0, mean, log_std) - ladj)]
        log_p = [at_least_float32(self._log_prior_top(z))]
        latents = {f"z{L}": z}
        t = None
        for l in range(L - 2, -1, -1):  # down through the layers below
            t, p_mean, p_log_std = self._prior_step(l, z)
            both = torch.cat([d[l], t], -1)
            d_mean, d_log_std = self.posterior_heads[l](both)
            q_mean, q_log_std = p_mean + d_mean, bounded_log_std(p_log_std + d_log_std, self.log_var_bounds)
            z0 = q_mean + torch.exp(q_log_std) * eps(l)
            z, ladj = self._flow(l, z0, self.contexts[l](both) if len(self.contexts) else None)
            log_q.append(at_least_float32(gaussian_log_prob(z0, q_mean, q_log_std) - ladj))
            log_p.append(at_least_float32(gaussian_log_prob(z, p_mean, p_log_std)))
            latents[f"z{l + 1}"] = z
        # sorted by name, not sorted(latents.items()): torch.compile cannot sort tuples holding tensors
        return z, t, log_q, log_p, {name: latents[name] for name in sorted(latents)}

    def init_output_bias(self, mean_image: torch.Tensor) -> None:
        with torch.no_grad():
            self.decoder[-1].bias.copy_(self.likelihood.params_for_mean(mean_image).flatten())

    def _decode(self, z: torch.Tensor, t: torch.Tensor | None, x: torch.Tensor | None = None) -> torch.Tensor:
        """Likelihood parameters (…, P·C, H, W) from z_1 and the skip t_1; the autoregressive decoder
        also reads the prepared images x (B, C, H, W) (each pixel's logit sees the pixels before it)."""
        inputs = self._decoder_input(z, t)
        if not self.autoregressive:
            params = self.decoder(inputs)
        else:
            if x is None:
                raise ValueError("the autoregressive decoder scores images: pass x")
            h = self.decoder[:-1](inputs)
            params = self._autoregressive_logits(x, h, self.decoder[-1](h))
        return params.unflatten(-1, (-1, *self.image_shape[1:]))

    @staticmethod
    def _decoder_input(z: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """z_1 and the skip t_1 side by side, (…, D [+ H])."""
        return z if t is None else torch.cat([z, t], -1)

    def _autoregressive_logits(self, x: torch.Tensor, h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Each pixel's logit given the latents and the pixels before it: x (B, C, H, W), the decoder's
        last hidden layer h (…, B, H) and its logits ``base`` (…, B, P) -> (…, B, P).  The PixelCNN
        term's convolutions read x alone, so they run once per image for any number of samples."""
        x = x.to(h.dtype)
        logits = base + self.pixel_made(x.flatten(1), h) if self.pixel_made is not None else base
        return logits + self.pixel_cnn(x, base) if self.pixel_cnn is not None else logits

    def _mean_image(
        self, z: torch.Tensor, t: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The likelihood's mean at (z_1, t_1), (n, C, H, W); for the autoregressive decoder each
        pixel's probability given the pixels drawn before it."""
        if not self.autoregressive:
            return self.likelihood.mean(self._decode(z, t))
        h = self.decoder[:-1](self._decoder_input(z, t))
        base = self.decoder[-1](h)
        _, probs = sample_autoregressively(
            lambda x: self._autoregressive_logits(x.unflatten(-1, self.image_shape), h, base), base, generator
        )
        return probs.unflatten(-1, self.image_shape)

    def log_densities(
        self, x: torch.Tensor, encoded: BottomUp, samples: int = 1, noise: Noise | None = None
    ) -> LogDensities:
        noise = as_noise(self, noise)
        d = [f.expand(samples, *f.shape) for (f,) in encoded.layers]  # (K, B, H) views

        def eps(l: int) -> torch.Tensor:  # in the model's dtype: d[l] is 16-bit under autocast
            if noise is not None:
                return noise[f"z{l + 1}"].to(self.dtype)
            return torch.randn(*d[l].shape[:-1], self.latent_dim, device=d[l].device, dtype=self.dtype)

        z, t, log_q, log_p, latents = self._top_down(d, eps)
        target = self.likelihood.prepare(x, dtype=self.dtype)
        params = at_least_float32(self._decode(z, t, target))
        log_px = self.likelihood.log_prob(params, target.to(params.dtype))
        log_q_t, log_p_t = torch.stack(log_q, -1), torch.stack(log_p, -1)  # (K, B, L), top layer first
        L = self.layers
        return LogDensities(
            log_px,
            log_p_t.sum(-1),
            log_q_t.sum(-1),
            latents,
            kl_groups=log_q_t - log_p_t,
            group_units=(self.latent_dim,) * L,
            group_names=tuple(f"z{L - i}" for i in range(L)),
        )

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        ref = next(self.parameters())
        z = sample_prior(self.prior, n, (self.latent_dim,), ref, generator)
        t = None
        for l in range(self.layers - 2, -1, -1):
            t, mean, log_std = self._prior_step(l, z)
            z = mean + torch.exp(log_std) * torch.randn(
                mean.shape, generator=generator, device=ref.device, dtype=ref.dtype
            )
        return self._mean_image(z, t, generator)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        d = [f for (f,) in self.encode(x).layers]
        z, t, *_ = self._top_down(d, lambda l: d[l].new_empty(*d[l].shape[:-1], self.latent_dim).normal_())
        return self._mean_image(z, t)
