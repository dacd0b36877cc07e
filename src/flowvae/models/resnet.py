"""The ResNet VAE with bidirectional inference and IAF of Kingma et al. (2016) (openai/iaf, ``tf_train.py``).

One resolution h × w (the image after a 5x5 stride-2 convolution, or the image itself with
``downsample=False``) carries L stochastic layers z_1 (bottom) … z_L (top), each (Cz, h, w).

Bottom-up (once per batch, :meth:`ResNetVAE.encode`), for l = 1 … L:

    [μ_l^q, log σ_l^q, c_l^up, r] = conv(ELU(h)),   h ← h + 0.1 · conv(ELU(r))

Top-down (per sample, :meth:`ResNetVAE.log_densities`), from the learned top state h_top, for l = L … 1:

    [μ_l^p, log σ_l^p, μ_l^r, log σ_l^r, c_l^down, d] = conv(ELU(h))
    prior      p(z_l | z_>l) = N(μ_l^p, σ_l^p)              (the top layer: ``self.prior``)
    posterior  z_l⁰ = μ_l^q + μ_l^r + exp(log σ_l^q + log σ_l^r) ⊙ ε_l,   ε_l ~ N(0, I)
    flow       z_l = f_l(z_l⁰; c_l^up + c_l^down)               (one ConvIAF step by default)
    h ← h + 0.1 · conv(ELU([z_l, d]))

and the decoder maps ELU(h) back to the image's likelihood parameters with a 5x5 stride-2
transposed convolution.  log q(z|x) = Σ_l [log N(z_l⁰) − log|det ∂z_l/∂z_l⁰|] and
log p(z) = Σ_l log p(z_l | z_>l); the KL splits into one free-bits group per (layer, channel),
summed over space, as in openai/iaf's ``kl_min``.

Every convolution of the ResNet is weight-normalised (``torch.nn.utils.parametrizations.weight_norm``)
and gets a data-dependent initialisation from :func:`~flowvae.models.weight_norm.initialise`: the trainer calls
``model.initialise(x_batch)`` once at the start of a fresh run (never on resume).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flowvae.distributions import gaussian_log_density, gaussian_log_prob
from flowvae.flows.base import Flow
from flowvae.flows.factory import build_image_flow
from flowvae.models.base import BottomUp, LatentVariableModel, LogDensities, Noise, draw_noise
from flowvae.models.likelihoods import Likelihood, build_likelihood
from flowvae.models.vae import as_unit_interval
from flowvae.models.weight_norm import initialise, weight_normed
from flowvae.numerics import at_least_float32, soft_clamp
from flowvae.priors import DiagonalGaussianPrior, Prior, split_equally

RESIDUAL_SCALE = 0.1  # residual branches are scaled by 0.1 (openai/iaf)
HEAD_INIT_SCALE = 0.1  # data-dependent init: std of the channels that give means and log-scales


class ResNetLayer(nn.Module):
    """One stochastic layer of the ResNet VAE (openai/iaf's ``IAFLayer``, without downsampling).

    The top layer (``top=True``) has no bottom-up residual branch (nothing reads its output) and
    no prior head (its prior is the model's ``prior``).
    """

    def __init__(
        self, channels: int, latent_channels: int, top: bool, flow: Sequence[Flow], log_std_bound: float = 8.0
    ) -> None:
        super().__init__()
        self.channels, self.latent_channels, self.top = channels, latent_channels, top
        self.log_std_bound = log_std_bound
        c, z = channels, latent_channels
        self.up_sizes = [z, z, c] + ([] if top else [c])
        self.up_in = weight_normed(
            nn.Conv2d(c, sum(self.up_sizes), 3, padding=1),
            [HEAD_INIT_SCALE] * 2 * z + [1.0] * (sum(self.up_sizes) - 2 * z),
        )
        self.up_out = None if top else weight_normed(nn.Conv2d(c, c, 3, padding=1))
        heads = 2 * z if top else 4 * z  # [μ_p, log σ_p,] μ_r, log σ_r
        self.down_sizes = [z] * (heads // z) + [c, c]
        self.down_in = weight_normed(
            nn.Conv2d(c, heads + 2 * c, 3, padding=1), [HEAD_INIT_SCALE] * heads + [1.0] * 2 * c
        )
        self.down_out = weight_normed(nn.Conv2d(z + c, c, 3, padding=1))
        self.flow = nn.ModuleList(flow)

    def up(self, h: torch.Tensor) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """h (B, C, h, w) -> (the next h or None for the top layer, (μ_q, log σ_q, up-context))."""
        parts = self.up_in(F.elu(h)).split(self.up_sizes, dim=1)
        if self.top:
            return None, parts
        q_mean, q_log_std, context, r = parts
        return h + RESIDUAL_SCALE * self.up_out(F.elu(r)), (q_mean, q_log_std, context)

    def _down_parts(self, h: torch.Tensor, samples: int) -> dict[str, torch.Tensor]:
        out = self.down_in(F.elu(h))
        out = out.reshape(samples, -1, *out.shape[1:])
        names = ("r_mean", "r_log_std", "context", "h_det")
        if not self.top:
            names = ("p_mean", "p_log_std") + names
        return dict(zip(names, out.split(self.down_sizes, dim=2)))

    def _residual(self, h: torch.Tensor, z: torch.Tensor, h_det: torch.Tensor) -> torch.Tensor:
        z, h_det = z.reshape(-1, *z.shape[-3:]), h_det.reshape(-1, *h_det.shape[-3:])
        return h + RESIDUAL_SCALE * self.down_out(F.elu(torch.cat([z.to(h_det.dtype), h_det], dim=1)))

    def _flow(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (K, B, Cz, h, w) -> (z_K, log|det| per channel (K, B, Cz)); see :meth:`Flow.forward_per_channel`."""
        per_channel = z.new_zeros(z.shape[:-2])
        step: Flow
        for step in self.flow:
            z, log_det = step.forward_per_channel(z, context)
            per_channel = per_channel + log_det
        return z, per_channel

    def down(
        self, h: torch.Tensor, up: tuple[torch.Tensor, torch.Tensor, torch.Tensor], eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One posterior step of the top-down pass.

        h (K·B, C, h, w); up = (μ_q, log σ_q, up-context), each (B, ·, h, w); eps (K, B, Cz, h, w).
        Returns the next h (K·B, C, h, w), z_l (K, B, Cz, h, w), log q(z_l | z_>l, x) and
        log p(z_l | z_>l) per channel (K, B, Cz) (None for the top layer), in at least float32.
        """
        parts = self._down_parts(h, eps.shape[0])
        q_mean, q_log_std, up_context = up
        dtype = torch.promote_types(eps.dtype, torch.float32)
        mean = q_mean.to(dtype) + parts["r_mean"].to(dtype)
        log_std = soft_clamp(q_log_std.to(dtype) + parts["r_log_std"].to(dtype), self.log_std_bound)
        eps = eps.to(dtype)
        z = mean + torch.exp(log_std) * eps
        log_q = gaussian_log_density(eps, log_std).sum((-2, -1))
        z, log_det = self._flow(z, up_context + parts["context"])
        log_q = log_q - log_det
        log_p = None
        if not self.top:
            p_log_std = soft_clamp(parts["p_log_std"].to(dtype), self.log_std_bound)
            log_p = gaussian_log_prob(z, parts["p_mean"].to(dtype), p_log_std, (-2, -1))
        return self._residual(h, z, parts["h_det"]), z, log_q, log_p

    def generate(self, h: torch.Tensor, z: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
        """One prior step: z_l = μ_p + σ_p ⊙ eps (or the given z for the top layer); returns the next h."""
        parts = self._down_parts(h, 1)
        if z is None:
            p_log_std = soft_clamp(parts["p_log_std"], self.log_std_bound)
            z = parts["p_mean"] + torch.exp(p_log_std) * eps.unsqueeze(0)
        return self._residual(h, z, parts["h_det"])


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class ResNetVAE(LatentVariableModel[BottomUp]):
    """Kingma et al. (2016)'s ResNet VAE with bidirectional inference and a posterior flow per layer.

    Args:
        image_shape: (C, H, W) of the data.
        likelihood: p(x|z) (e.g. Bernoulli for binary images, DiscretizedLogistic for 8-bit).
        layers: L, the number of stochastic layers.
        channels: deterministic channels of the ResNet (openai/iaf's ``h_size``).
        latent_channels: Cz, channels of each latent layer (``z_size``).
        flow: posterior flow of each layer, 'iaf' (ConvIAF), 'glow', 'coupling' or 'none'.
        flow_steps: flow steps per layer.
        flow_hidden: hidden channels of each flow step's network (default ``channels``).
        downsample: a 5x5 stride-2 input convolution (latents at ⌈H/2⌉ × ⌈W/2⌉) and a 5x5
            stride-2 transposed convolution out; otherwise 3x3 convolutions at full resolution.
        log_std_bound: every log σ is soft-clamped to ±this.

    ``noise_shapes()`` is {"z1": (Cz, h, w), …, "zL": …}, z1 the bottom layer.  KL groups are
    (layer, channel), named "z3/c7", one free-bits unit each, log q − log p summed over space.
    ConvIAF's log-det is per element, so it splits by channel exactly; a Glow or coupling step's
    log-det (and the log-density of a replacement prior that does not factorise over channels, see
    :meth:`~flowvae.priors.Prior.log_prob_per_channel`) is shared equally among the layer's channels,
    so the groups still sum to log q − log p.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        likelihood: Likelihood,
        layers: int = 4,
        channels: int = 64,
        latent_channels: int = 16,
        flow: str = "iaf",
        flow_steps: int = 1,
        flow_hidden: int | None = None,
        downsample: bool = True,
        log_std_bound: float = 8.0,
    ) -> None:
        super().__init__()
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
        if min(layers, channels, latent_channels) < 1:
            raise ValueError(
                f"layers, channels and latent_channels must be >= 1, got {layers}, {channels}, {latent_channels}"
            )
        if not isinstance(likelihood, Likelihood):
            raise ValueError(f"likelihood must be a Likelihood, got {type(likelihood).__name__}")
        flow_hidden = channels if flow_hidden is None else flow_hidden
        if flow_hidden < 1:
            raise ValueError(f"flow_hidden must be >= 1, got {flow_hidden}")
        self.image_shape, self.likelihood = image_shape, likelihood
        self.num_layers, self.channels, self.latent_channels = layers, channels, latent_channels
        self.flow_kind, self.flow_steps, self.downsample = flow, flow_steps, downsample
        c_img, height, width = image_shape
        size = ((height + 1) // 2, (width + 1) // 2) if downsample else (height, width)
        self.latent_shape = (latent_channels, *size)
        out_channels = likelihood.params_per_pixel * c_img
        if downsample:
            self.input_conv = weight_normed(nn.Conv2d(c_img, channels, 5, stride=2, padding=2))
            # (h − 1)·2 − 4 + 5 + output_padding = H: output_padding is 1 for even H, 0 for odd.
            self.output_conv = weight_normed(
                nn.ConvTranspose2d(
                    channels, out_channels, 5, stride=2, padding=2, output_padding=(1 - height % 2, 1 - width % 2)
                ),
                HEAD_INIT_SCALE,
            )
        else:
            self.input_conv = weight_normed(nn.Conv2d(c_img, channels, 3, padding=1))
            self.output_conv = weight_normed(nn.Conv2d(channels, out_channels, 3, padding=1), HEAD_INIT_SCALE)
        self.layers = nn.ModuleList(
            ResNetLayer(
                channels,
                latent_channels,
                top=(index == layers - 1),
                flow=build_image_flow(flow, latent_channels, flow_steps, flow_hidden, channels),
                log_std_bound=log_std_bound,
            )
            for index in range(layers)
        )
        self.h_top = nn.Parameter(torch.zeros(channels))
        self.prior: nn.Module = DiagonalGaussianPrior(self.latent_shape, log_std_bound)

    # -- the protocol ----------------------------------------------------------------------

    def noise_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"z{index + 1}": self.latent_shape for index in range(self.num_layers)}

    def encode(self, x: torch.Tensor) -> BottomUp:
        """The bottom-up pass: per layer μ_q, log σ_q and the up-context, each (B, ·, h, w)."""
        self.check_input(x)
        h = self.input_conv(as_unit_interval(x, self.h_top.dtype) - 0.5)
        ups = []
        for layer in self.layers:
            h, up = layer.up(h)
            ups.append(up)
        return BottomUp(ups)

    def log_densities(
        self, x: torch.Tensor, encoded: BottomUp, samples: int = 1, noise: Noise | None = None
    ) -> LogDensities:
        """Draw ``samples`` z ~ q(z|x) top-down (from ``noise`` {zl: (samples, B, Cz, h, w)} if given)
        and score them: every density (samples, B) in at least float32; ``kl_groups``
        (samples, B, L·Cz) ordered z1/c0, z1/c1, …, zL/c(Cz−1)."""
        self.check_input(x)
        batch = x.shape[0]
        if not isinstance(encoded, BottomUp) or encoded.batch_size != batch:
            raise ValueError(f"encoded must be this model's encode() of the same batch of {batch}")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        noise = draw_noise(self, samples, batch) if noise is None else self._check_noise(noise, samples, batch)
        h, latents, log_q, log_p = self._top_down(encoded, noise, samples)
        params = at_least_float32(self._decode(h, samples))
        log_likelihood = self.likelihood.log_prob(params, self.likelihood.prepare(x))
        log_q, log_p = torch.stack(log_q, dim=2), torch.stack(log_p, dim=2)  # (K, B, L, Cz)
        names = tuple(f"z{layer + 1}/c{c}" for layer in range(self.num_layers) for c in range(self.latent_channels))
        return LogDensities(
            log_likelihood,
            log_p.sum((-2, -1)),
            log_q.sum((-2, -1)),
            latents,
            kl_groups=(log_q - log_p).flatten(-2),
            group_units=(1,) * len(names),
            group_names=names,
        )

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, H, W) in [0, 1]: ancestral sampling from the prior, top-down, and the
        likelihood's mean (the posterior flows are not used)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        h = self._top_state(n)
        for layer in reversed(self.layers):
            if layer.top:
                h = layer.generate(h, z=self.prior.sample(n, generator).to(h.dtype))
            else:
                eps = torch.randn(n, *self.latent_shape, generator=generator, device=h.device, dtype=h.dtype)
                h = layer.generate(h, eps=eps)
        return self.likelihood.mean(at_least_float32(self._decode(h, 1)[0]))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean at one posterior sample, (B, C, H, W)."""
        encoded = self.encode(x)
        h, *_ = self._top_down(encoded, draw_noise(self, 1, x.shape[0]), 1)
        return self.likelihood.mean(at_least_float32(self._decode(h, 1)[0]))

    def initialise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Data-dependent initialisation on a batch x (see :func:`~flowvae.models.weight_norm.initialise`);
        call once, before training."""
        initialise(self, x, generator)

    # -- internals -------------------------------------------------------------------------

    def _check_noise(self, noise: Mapping[str, torch.Tensor], samples: int, batch: int) -> Noise:
        shapes = self.noise_shapes()
        if not isinstance(noise, Mapping) or set(noise) != set(shapes):
            given = sorted(noise) if isinstance(noise, Mapping) else type(noise).__name__
            raise ValueError(f"noise must be a dict with keys {list(shapes)}, got {given}")
        for name, shape in shapes.items():
            if tuple(noise[name].shape) != (samples, batch, *shape):
                raise ValueError(
                    f"noise[{name!r}] must have shape {(samples, batch, *shape)}, got {tuple(noise[name].shape)}"
                )
        return dict(noise)

    def _top_state(self, n: int) -> torch.Tensor:
        return self.h_top.view(1, -1, 1, 1).expand(n, -1, *self.latent_shape[1:])

    def _top_down(
        self, encoded: BottomUp, noise: Noise, samples: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """h (K·B, C, h, w) after the last layer, latents {zl: (K, B, Cz, h, w)}, and per layer
        (bottom first) log q and log p per channel (K, B, Cz)."""
        h = self._top_state(samples * encoded.batch_size)
        latents, log_q, log_p = {}, [None] * self.num_layers, [None] * self.num_layers
        for index in reversed(range(self.num_layers)):
            layer, name = self.layers[index], f"z{index + 1}"
            h, z, log_q[index], log_p[index] = layer.down(h, encoded.layers[index], noise[name])
            if log_p[index] is None:
                log_p[index] = self._top_log_prob_per_channel(z)
            latents[name] = z
        return h, dict(sorted(latents.items(), key=lambda item: int(item[0][1:]))), log_q, log_p

    def _top_log_prob_per_channel(self, z: torch.Tensor) -> torch.Tensor:
        """The top prior's log-density per channel (K, B, Cz); a module that is not a :class:`Prior`
        (only ``log_prob`` and ``sample``) shares its total equally among the channels."""
        if isinstance(self.prior, Prior):
            return self.prior.log_prob_per_channel(z)
        return split_equally(self.prior.log_prob(z), z.shape[-3])

    def _decode(self, h: torch.Tensor, samples: int) -> torch.Tensor:
        """h (K·B, C, h, w) -> likelihood parameters (K, B, P·C_img, H, W)."""
        params = self.output_conv(F.elu(h))
        return params.reshape(samples, -1, *params.shape[1:])


def build_resnet_vae(
    image_shape: Sequence[int],
    likelihood: Likelihood | str,
    layers: int = 4,
    channels: int = 64,
    latent_channels: int = 16,
    flow: str = "iaf",
    flow_steps: int = 1,
    flow_hidden: int | None = None,
    downsample: bool = True,
    data_kind: str = "binary",
) -> ResNetVAE:
    """A ResNet VAE; ``likelihood`` may be a name (checked against ``data_kind``).

    Kingma et al.'s CIFAR-10 model: ``build_resnet_vae((3, 32, 32), "discretized_logistic",
    layers=20, channels=160, latent_channels=32, flow="iaf", flow_steps=1, data_kind="8bit")``.
    """
    if isinstance(likelihood, str):
        likelihood = build_likelihood(likelihood, data_kind)
    return ResNetVAE(
        image_shape,
        likelihood,
        layers=layers,
        channels=channels,
        latent_channels=latent_channels,
        flow=flow,
        flow_steps=flow_steps,
        flow_hidden=flow_hidden,
        downsample=downsample,
    )
