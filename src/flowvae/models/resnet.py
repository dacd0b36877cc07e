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
and gets a data-dependent initialisation from :func:`initialise`: the trainer calls
``model.initialise(x_batch)`` once at the start of a fresh run (never on resume).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from flowvae.flows.base import Flow
from flowvae.flows.glow import ActNorm, AffineCoupling, InvertibleConv1x1
from flowvae.flows.masked_conv import ConvIAF, add_context, check_spatial
from flowvae.models.base import LatentVariableModel, LogDensities, Noise, draw_noise
from flowvae.models.likelihoods import Likelihood, build_likelihood
from flowvae.numerics import at_least_float32, soft_clamp

LOG_2PI = math.log(2.0 * math.pi)
FLOW_KINDS = ("iaf", "glow", "coupling", "none")
RESIDUAL_SCALE = 0.1   # residual branches are scaled by 0.1 (openai/iaf)
HEAD_INIT_SCALE = 0.1  # data-dependent init: std of the channels that give means and log-scales
V_INIT_STD = 0.05      # initial std of the weight-norm directions v (openai/iaf)


def gaussian_log_prob_per_channel(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Σ over (H, W) of log N(z; μ, exp(log σ)²): (…, C, H, W) -> (…, C)."""
    eps = (z - mean) * torch.exp(-log_std)
    return (-0.5 * eps * eps - log_std - 0.5 * LOG_2PI).sum((-2, -1))


# --------------------------------------------------------------------------------------------
# Weight normalisation with data-dependent initialisation (Salimans & Kingma 2016)
# --------------------------------------------------------------------------------------------

def weight_normed(module: nn.Conv2d | nn.ConvTranspose2d, init_scale: float | Sequence[float] = 1.0) -> nn.Module:
    """``module`` with w = g · v / ‖v‖ per output channel, and the standard deviation
    (one number, or one per output channel) that :func:`initialise` gives its outputs.

    v starts N(0, 0.05²) as in openai/iaf, not at PyTorch's ±1/√fan_in: Adam(ax) moves every
    entry of v by about the learning rate, so the direction turns by ~lr/|v| per step, which at
    160 channels (|v| ≈ 0.015) made the first steps diverge.  g starts at √(1/3), the norm of
    PyTorch's default init, so an uninitialised layer keeps the usual scale.
    """
    with torch.no_grad():
        nn.init.normal_(module.weight, 0.0, V_INIT_STD)
    dim = 1 if isinstance(module, nn.ConvTranspose2d) else 0
    module = weight_norm(module, dim=dim)
    with torch.no_grad():
        module.parametrizations.weight.original0.fill_(math.sqrt(1.0 / 3.0))
    module.init_scale = float(init_scale) if isinstance(init_scale, (int, float)) else tuple(init_scale)
    return module


def _data_init_hook(done: set[nn.Module]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if module in done:  # only the first call of each layer is initialised
            return None
        done.add(module)
        y = output.detach().float()
        mean, std = y.mean((0, 2, 3)), y.std((0, 2, 3), unbiased=False)
        target = torch.as_tensor(module.init_scale, dtype=y.dtype, device=y.device).expand_as(std)
        # A channel that does not vary on the batch (a constant input, e.g. the top state) keeps its scale.
        factor = torch.where(std > 1e-5, target / std.clamp_min(1e-5), torch.ones_like(std))
        g = module.parametrizations.weight.original0
        g.mul_(factor.to(g.dtype).view(g.shape))
        module.bias.copy_(((module.bias.float() - mean) * factor).to(module.bias.dtype))
        shape = (1, -1, 1, 1)
        return ((output.float() - mean.view(shape)) * factor.view(shape)).to(output.dtype)
    return hook


@torch.no_grad()
def initialise(model: LatentVariableModel, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Data-dependent initialisation of every weight-normalised layer that declares an ``init_scale``.

    One forward pass (one posterior sample, in training mode) over the batch x; each layer, the
    first time it runs, rescales g and sets its bias so that its outputs on the batch have zero
    mean and standard deviation ``init_scale`` per channel (1: the pre-activation of a hidden
    layer; 0.1: the channels that give means and log-scales, and the decoder's output), then
    passes the normalised output on, so later layers are initialised on what they will see.
    The noise comes from ``generator`` (default: a fresh one seeded 0), not from torch's global
    generator.  Flows with their own data-dependent init (ActNorm) initialise in the same pass.
    """
    done: set[nn.Module] = set()
    layers = [m for m in model.modules() if hasattr(m, "init_scale") and parametrize.is_parametrized(m, "weight")]
    handles = [m.register_forward_hook(_data_init_hook(done)) for m in layers]
    was_training = model.training
    model.train()
    try:
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(0)
        model(x, 1, draw_noise(model, 1, x.shape[0], generator=generator))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# The top prior and the Glow-style posterior steps on spatial latents
# --------------------------------------------------------------------------------------------

class DiagonalGaussianPrior(nn.Module):
    """p(z_L) = N(μ, diag σ²) over (C, H, W) with learned μ and log σ (soft-clamped to ±``log_std_bound``).

    openai/iaf computes the top prior by a convolution of the learned constant h_top, so it is a
    learned constant; here it is parameterised directly.  Any module with ``log_prob(z)``
    (…, C, H, W) -> (…) and ``sample(n, generator)`` -> (n, C, H, W) may replace it as
    ``ResNetVAE.prior``; ``log_prob_per_channel`` (…, C) is optional (without it the top layer's
    log-prior is shared equally among its channels' KL groups).
    """

    def __init__(self, shape: Sequence[int], log_std_bound: float = 8.0) -> None:
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"DiagonalGaussianPrior needs a (C, H, W) shape, got {tuple(shape)}")
        self.shape, self.log_std_bound = tuple(shape), log_std_bound
        self.mean = nn.Parameter(torch.zeros(self.shape))
        self.raw_log_std = nn.Parameter(torch.zeros(self.shape))

    def log_std(self) -> torch.Tensor:
        return soft_clamp(self.raw_log_std, self.log_std_bound)

    def log_prob_per_channel(self, z: torch.Tensor) -> torch.Tensor:
        """(…, C, H, W) -> (…, C)."""
        if tuple(z.shape[-3:]) != self.shape:
            raise ValueError(f"DiagonalGaussianPrior expects z of shape (..., {', '.join(map(str, self.shape))}), "
                             f"got {tuple(z.shape)}")
        return gaussian_log_prob_per_channel(z, self.mean, self.log_std())

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """(…, C, H, W) -> (…)."""
        return self.log_prob_per_channel(z).sum(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, C, H, W)."""
        eps = torch.randn(n, *self.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(self.log_std()) * eps


class SpatialContextCoupling(AffineCoupling):
    """Glow's affine coupling on (…, C, H, W) whose conditioner also reads a spatial context
    (…, Cc, H, W), through an unmasked 1x1 convolution added to its first hidden layer.

    :class:`~flowvae.flows.AffineCoupling` takes a context vector; the ResNet VAE's context is
    a feature map.  Everything else (the 3x3-1x1-3x3 conditioner, sigmoid(s + 2) scale, halves,
    inverse) is AffineCoupling's.
    """

    def __init__(self, channels: int, hidden: int, context_channels: int | None = None, swap: bool = False) -> None:
        super().__init__(channels, hidden, None, event_dim=3, swap=swap)
        self.context_dim = context_channels
        self.context_layer = nn.Conv2d(context_channels, hidden, 1, bias=False) if context_channels else None

    def _check(self, z: torch.Tensor, features: int, context: torch.Tensor | None) -> None:
        check_spatial(type(self).__name__, z, features, context, self.context_dim)

    def _conditioner(self, x_cond: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x_cond.shape[:-3]
        h = self.first(x_cond.reshape(-1, *x_cond.shape[-3:]))
        if self.context_layer is not None:
            c = self.context_layer(context.reshape(-1, *context.shape[-3:]))
            h = add_context(h, batch, c.reshape(*context.shape[:-3], *c.shape[1:]))
        h = self.last(F.relu(self.middle(F.relu(h))))
        shift, raw = h.reshape(*batch, *h.shape[1:]).to(x_cond.dtype).split(self.n_out, dim=-3)
        return shift, F.logsigmoid(raw + 2.0)


def posterior_flow_steps(kind: str, latent_channels: int, steps: int, hidden: int, context_channels: int) -> list[Flow]:
    """The posterior flow of one layer as a list of steps, each conditioned on the spatial context.

    'iaf': ``steps`` ConvIAF steps, channel order reversed between steps; 'glow': ``steps`` ×
    (ActNorm, invertible 1x1 conv, coupling); 'coupling': ``steps`` couplings, halves swapped
    between steps; 'none' (or steps = 0): no flow.
    """
    if kind not in FLOW_KINDS:
        raise ValueError(f"unknown flow {kind!r} for the ResNet VAE; choose one of {', '.join(FLOW_KINDS)}")
    if steps < 0:
        raise ValueError(f"flow_steps must be >= 0, got {steps}")
    if kind in ("glow", "coupling") and steps > 0 and latent_channels < 2:
        raise ValueError(f"flow {kind!r} needs latent_channels >= 2, got {latent_channels}")
    out: list[Flow] = []
    for k in range(steps if kind != "none" else 0):
        if kind == "iaf":
            order = "natural" if k % 2 == 0 else "reversed"
            out.append(ConvIAF(latent_channels, hidden, context_channels, order=order))
            continue
        if kind == "glow":
            out += [ActNorm(latent_channels), InvertibleConv1x1(latent_channels)]
        out.append(SpatialContextCoupling(latent_channels, hidden, context_channels, swap=k % 2 == 1))
    return out


# --------------------------------------------------------------------------------------------
# One stochastic layer: a ResNet block with a bottom-up and a top-down path
# --------------------------------------------------------------------------------------------

@dataclass
class BottomUp:
    """What the bottom-up pass leaves for the top-down pass, per layer (bottom first), each (B, ·, h, w)."""

    q_mean: list[torch.Tensor]
    q_log_std: list[torch.Tensor]
    context: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.q_mean[0].shape[0]


class ResNetLayer(nn.Module):
    """One stochastic layer of the ResNet VAE (openai/iaf's ``IAFLayer``, without downsampling).

    The top layer (``top=True``) has no bottom-up residual branch (nothing reads its output) and
    no prior head (its prior is the model's ``prior``).
    """

    def __init__(self, channels: int, latent_channels: int, top: bool, flow: Sequence[Flow],
                 log_std_bound: float = 8.0) -> None:
        super().__init__()
        self.channels, self.latent_channels, self.top = channels, latent_channels, top
        self.log_std_bound = log_std_bound
        c, z = channels, latent_channels
        self.up_sizes = [z, z, c] + ([] if top else [c])
        self.up_in = weight_normed(nn.Conv2d(c, sum(self.up_sizes), 3, padding=1),
                                   [HEAD_INIT_SCALE] * 2 * z + [1.0] * (sum(self.up_sizes) - 2 * z))
        self.up_out = None if top else weight_normed(nn.Conv2d(c, c, 3, padding=1))
        heads = 2 * z if top else 4 * z  # [μ_p, log σ_p,] μ_r, log σ_r
        self.down_sizes = [z] * (heads // z) + [c, c]
        self.down_in = weight_normed(nn.Conv2d(c, heads + 2 * c, 3, padding=1),
                                     [HEAD_INIT_SCALE] * heads + [1.0] * 2 * c)
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
        """z (K, B, Cz, h, w) -> (z_K, log|det| per channel (K, B, Cz)); a step without a per-element
        log-det shares its total equally among the channels."""
        per_channel = z.new_zeros(z.shape[:-2])
        for step in self.flow:
            if hasattr(step, "forward_elementwise"):
                z, log_det = step.forward_elementwise(z, context)
                per_channel = per_channel + log_det.sum((-2, -1))
            else:
                z, log_det = step(z, context)
                per_channel = per_channel + log_det.unsqueeze(-1) / z.shape[-3]
        return z, per_channel

    def down(self, h: torch.Tensor, up: tuple[torch.Tensor, torch.Tensor, torch.Tensor], eps: torch.Tensor
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
        log_q = (-0.5 * eps * eps - log_std - 0.5 * LOG_2PI).sum((-2, -1))
        z, log_det = self._flow(z, up_context + parts["context"])
        log_q = log_q - log_det
        log_p = None
        if not self.top:
            p_log_std = soft_clamp(parts["p_log_std"].to(dtype), self.log_std_bound)
            log_p = gaussian_log_prob_per_channel(z, parts["p_mean"].to(dtype), p_log_std)
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

def _input_to_unit_interval(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """8-bit (integer) pixels / 255; float data in [0, 1] as they are."""
    return x.to(dtype) if x.is_floating_point() else x.to(dtype) / 255.0


class ResNetVAE(LatentVariableModel):
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
    log-det (and a replacement prior without ``log_prob_per_channel``) is shared equally among
    the layer's channels, so the groups still sum to log q − log p.
    """

    def __init__(self, image_shape: Sequence[int], likelihood: Likelihood, layers: int = 4, channels: int = 64,
                 latent_channels: int = 16, flow: str = "iaf", flow_steps: int = 1, flow_hidden: int | None = None,
                 downsample: bool = True, log_std_bound: float = 8.0) -> None:
        super().__init__()
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
        if min(layers, channels, latent_channels) < 1:
            raise ValueError(f"layers, channels and latent_channels must be >= 1, "
                             f"got {layers}, {channels}, {latent_channels}")
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
            self.output_conv = weight_normed(nn.ConvTranspose2d(
                channels, out_channels, 5, stride=2, padding=2, output_padding=(1 - height % 2, 1 - width % 2)),
                HEAD_INIT_SCALE)
        else:
            self.input_conv = weight_normed(nn.Conv2d(c_img, channels, 3, padding=1))
            self.output_conv = weight_normed(nn.Conv2d(channels, out_channels, 3, padding=1), HEAD_INIT_SCALE)
        self.layers = nn.ModuleList(
            ResNetLayer(channels, latent_channels, top=(index == layers - 1),
                        flow=posterior_flow_steps(flow, latent_channels, flow_steps, flow_hidden, channels),
                        log_std_bound=log_std_bound)
            for index in range(layers))
        self.h_top = nn.Parameter(torch.zeros(channels))
        self.prior = DiagonalGaussianPrior(self.latent_shape, log_std_bound)

    # -- the protocol ----------------------------------------------------------------------

    def noise_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"z{index + 1}": self.latent_shape for index in range(self.num_layers)}

    def encode(self, x: torch.Tensor) -> BottomUp:
        """The bottom-up pass: per layer μ_q, log σ_q and the up-context, each (B, ·, h, w)."""
        self.check_input(x)
        h = self.input_conv(_input_to_unit_interval(x, self.h_top.dtype) - 0.5)
        ups = []
        for layer in self.layers:
            h, up = layer.up(h)
            ups.append(up)
        return BottomUp(*(list(t) for t in zip(*ups)))

    def log_densities(self, x: torch.Tensor, encoded: BottomUp, samples: int = 1,
                      noise: Noise | None = None) -> LogDensities:
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
        log_q, log_p = torch.stack(log_q, dim=2), torch.stack(log_p, dim=2)   # (K, B, L, Cz)
        names = tuple(f"z{layer + 1}/c{c}" for layer in range(self.num_layers) for c in range(self.latent_channels))
        return LogDensities(log_likelihood, log_p.sum((-2, -1)), log_q.sum((-2, -1)), latents,
                            kl_groups=(log_q - log_p).flatten(-2), group_units=(1,) * len(names), group_names=names)

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
        """Data-dependent initialisation on a batch x (see :func:`initialise`); call once, before training."""
        initialise(self, x, generator)

    # -- internals -------------------------------------------------------------------------

    def _check_noise(self, noise: Mapping[str, torch.Tensor], samples: int, batch: int) -> Noise:
        shapes = self.noise_shapes()
        if not isinstance(noise, Mapping) or set(noise) != set(shapes):
            given = sorted(noise) if isinstance(noise, Mapping) else type(noise).__name__
            raise ValueError(f"noise must be a dict with keys {list(shapes)}, got {given}")
        for name, shape in shapes.items():
            if tuple(noise[name].shape) != (samples, batch, *shape):
                raise ValueError(f"noise[{name!r}] must have shape {(samples, batch, *shape)}, "
                                 f"got {tuple(noise[name].shape)}")
        return dict(noise)

    def _top_state(self, n: int) -> torch.Tensor:
        return self.h_top.view(1, -1, 1, 1).expand(n, -1, *self.latent_shape[1:])

    def _top_down(self, encoded: BottomUp, noise: Noise, samples: int
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """h (K·B, C, h, w) after the last layer, latents {zl: (K, B, Cz, h, w)}, and per layer
        (bottom first) log q and log p per channel (K, B, Cz)."""
        h = self._top_state(samples * encoded.batch_size)
        latents, log_q, log_p = {}, [None] * self.num_layers, [None] * self.num_layers
        for index in reversed(range(self.num_layers)):
            layer, name = self.layers[index], f"z{index + 1}"
            up = (encoded.q_mean[index], encoded.q_log_std[index], encoded.context[index])
            h, z, log_q[index], log_p[index] = layer.down(h, up, noise[name])
            if log_p[index] is None:
                log_p[index] = self._top_log_prob_per_channel(z)
            latents[name] = z
        return h, dict(sorted(latents.items(), key=lambda item: int(item[0][1:]))), log_q, log_p

    def _top_log_prob_per_channel(self, z: torch.Tensor) -> torch.Tensor:
        if hasattr(self.prior, "log_prob_per_channel"):
            return self.prior.log_prob_per_channel(z)
        total = self.prior.log_prob(z)
        return (total / z.shape[-3]).unsqueeze(-1).expand(*total.shape, z.shape[-3])

    def _decode(self, h: torch.Tensor, samples: int) -> torch.Tensor:
        """h (K·B, C, h, w) -> likelihood parameters (K, B, P·C_img, H, W)."""
        params = self.output_conv(F.elu(h))
        return params.reshape(samples, -1, *params.shape[1:])


def build_resnet_vae(image_shape: Sequence[int], likelihood: Likelihood | str, layers: int = 4, channels: int = 64,
                     latent_channels: int = 16, flow: str = "iaf", flow_steps: int = 1, flow_hidden: int | None = None,
                     downsample: bool = True, data_kind: str = "binary") -> ResNetVAE:
    """A ResNet VAE; ``likelihood`` may be a name (checked against ``data_kind``).

    Kingma et al.'s CIFAR-10 model: ``build_resnet_vae((3, 32, 32), "discretized_logistic",
    layers=20, channels=160, latent_channels=32, flow="iaf", flow_steps=1, data_kind="8bit")``.
    """
    if isinstance(likelihood, str):
        likelihood = build_likelihood(likelihood, data_kind)
    return ResNetVAE(image_shape, likelihood, layers, channels, latent_channels, flow, flow_steps, flow_hidden,
                     downsample)
