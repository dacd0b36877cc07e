"""Observation models p(x|z) for images.  A decoder outputs ``params`` of shape (..., P·C, H, W)
with P = ``params_per_pixel``; ``log_prob(params, x)`` sums over (C, H, W) and broadcasts x's batch
dimensions against params' (x (B, C, H, W) against params (K, B, P·C, H, W)).

Data kinds (see :mod:`flowvae.data`): 'binary' and 'grayscale' (after dynamic binarization) are
float {0, 1}; '8bit' is uint8 0..255.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flowvae.numerics import at_least_float32, soft_clamp
from flowvae.registry import Registry

LIKELIHOODS: Registry[type[Likelihood]] = Registry("likelihood")
"""Name -> likelihood class; a new likelihood is a :class:`Likelihood` subclass decorated with
:func:`register_likelihood`."""


def register_likelihood(cls: type[Likelihood]) -> type[Likelihood]:
    """Class decorator: add ``cls`` to :data:`LIKELIHOODS` under its ``name``."""
    return LIKELIHOODS.register(cls.name)(cls)


class Likelihood:
    """Base class: ``prepare`` turns a data batch into what ``log_prob`` expects."""

    name: str
    params_per_pixel: int
    data_kinds: tuple[str, ...]

    def prepare(
        self, x: torch.Tensor, *, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A data batch as ``log_prob`` reads it, in the model's floating ``dtype``; ``generator``
        draws any noise the likelihood adds (default: torch's global RNG)."""
        return x.to(dtype)

    @classmethod
    def for_data(cls, data_kind: str) -> Likelihood:
        """This likelihood for data of ``data_kind``; a one-line error if it cannot model them."""
        if data_kind not in cls.data_kinds:
            raise ValueError(
                f"likelihood {cls.name!r} cannot model {data_kind!r} data; it needs {' or '.join(cls.data_kinds)}"
            )
        return cls()

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | params) summed over (C, H, W), in at least float32 whatever the autocast
        precision: summed in 16 bits, Σ over 784 pixels of a trained MNIST model (500-2000 nats)
        would round by 4-8 nats, and the log-mean-exp of -log p(x) turns that noise into a bias."""
        params = at_least_float32(params)
        if not torch.is_autocast_enabled(params.device.type):
            return self._log_prob(params, x)
        with torch.autocast(params.device.type, enabled=False):
            return self._log_prob(params, x)

    def _log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Expected image with values in [0, 1], shape (..., C, H, W)."""
        raise NotImplementedError

    def discrete_nats_offset(self, dim: int) -> float:
        """Nats to add to -log p(x) to get -log P(x) of the 8-bit data (0 for discrete likelihoods)."""
        return 0.0

    def params_for_mean(self, mean_image: torch.Tensor) -> torch.Tensor:
        """Parameters (P·C, H, W) whose mean is ``mean_image`` (C, H, W): a decoder's initial output bias."""
        raise ValueError(f"the {self.name} likelihood has no output-bias initialisation from the data mean")


def _split(params: torch.Tensor, per_pixel: int) -> torch.Tensor:
    """(..., P·C, H, W) -> (..., C, P, H, W)."""
    return params.unflatten(-3, (-1, per_pixel))


def _dot_last(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_d a[..., d]·b[..., d] where b (B..., D) broadcasts over a's leading sample dims (K..., B..., D):
    for K > 1 a batched matrix-vector product, which reads a once and makes no (K, B, D) temporary
    (for K = 1, as in training, B tiny products would cost more than the temporary)."""
    n_lead = a.dim() - b.dim()
    if n_lead <= 0 or a.shape[n_lead:] != b.shape or math.prod(a.shape[:n_lead]) == 1:
        return (a * b).sum(-1)
    rows = b.reshape(-1, b.shape[-1])  # (B, D)
    out = torch.einsum("kbd,bd->kb", a.reshape(-1, *rows.shape), rows)  # (K, B)
    return out.reshape(a.shape[:-1])


@register_likelihood
class Bernoulli(Likelihood):
    """log p(x|z) = Σ x·l - softplus(l) with logits l; for binary images."""

    name, params_per_pixel, data_kinds = "bernoulli", 1, ("binary", "grayscale")

    def _log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits = params.flatten(-3)
        return _dot_last(logits, x.flatten(-3).to(logits.dtype)) - F.softplus(logits).sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def params_for_mean(self, mean_image: torch.Tensor) -> torch.Tensor:
        """logit(mean pixel), clamped to [1e-3, 1 − 1e-3] so that an always-0 pixel keeps a finite bias."""
        return torch.logit(mean_image.clamp(1e-3, 1 - 1e-3))


@register_likelihood
class Categorical256(Likelihood):
    """A 256-way softmax per pixel and channel (van den Berg et al. 2018's Frey Faces likelihood)."""

    name, params_per_pixel, data_kinds = "categorical256", 256, ("8bit",)

    def prepare(
        self, x: torch.Tensor, *, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return x.long()

    def _log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(_split(params, 256), dim=-3)  # (..., C, 256, H, W)
        index = x.unsqueeze(-3)  # (..., C, 1, H, W)
        batch = torch.broadcast_shapes(log_probs.shape[:-3], index.shape[:-3])
        log_probs = log_probs.expand(*batch, *log_probs.shape[-3:])
        index = index.expand(*batch, *index.shape[-3:])
        return log_probs.gather(-3, index).flatten(-4).sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(_split(params, 256), dim=-3)
        levels = torch.arange(256, dtype=probs.dtype, device=probs.device).view(256, 1, 1) / 255.0
        return (probs * levels).sum(-3)


@register_likelihood
class Gaussian(Likelihood):
    """N(y; μ, σ²) per pixel with learned log σ (soft-clamped to ±7), for 8-bit or real-valued data.

    8-bit pixels are dequantized, y = (x + u)/256 with u ~ U[0, 1) drawn afresh per pixel, so that
    E_u[-log p(y)] + D log 256 >= -log P(x) by Jensen (Uria et al. 2013; Theis et al. 2016): the
    reported bits/dim are an upper bound in expectation.  ``data_kind='continuous'`` scores real
    data as they are.  Binary data are refused: a density on {0, 1} is not a probability.
    """

    name, params_per_pixel, data_kinds = "gaussian", 2, ("8bit",)

    @classmethod
    def for_data(cls, data_kind: str) -> Likelihood:
        return cls(data_kind)  # says why binary data are refused

    def __init__(self, data_kind: str = "8bit") -> None:
        if data_kind in ("binary", "grayscale"):
            raise ValueError(
                f"likelihood 'gaussian' cannot model {data_kind!r} data: a density on {{0, 1}}-valued "
                f"pixels is not a probability (its -log p(x) can go below 0); use 'bernoulli'"
            )
        if data_kind not in ("8bit", "continuous"):
            raise ValueError(f"Gaussian models '8bit' or 'continuous' data, got {data_kind!r}")
        self.eight_bit = data_kind == "8bit"

    def prepare(
        self, x: torch.Tensor, *, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if not self.eight_bit:
            return x.to(dtype)
        u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
        return (x.to(dtype) + u) / 256.0

    def _log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean, raw = _split(params, 2).unbind(-3)
        log_std = soft_clamp(raw, 7.0)
        eps = (x - mean) * torch.exp(-log_std)
        return (-0.5 * eps * eps - log_std - 0.5 * math.log(2 * math.pi)).flatten(-3).sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return _split(params, 2)[..., 0, :, :].clamp(0.0, 1.0)

    def discrete_nats_offset(self, dim: int) -> float:
        return dim * math.log(256.0) if self.eight_bit else 0.0


@register_likelihood
class DiscretizedLogistic(Likelihood):
    """Logistic per pixel integrated over its 8-bit bin (Salimans et al. 2017, without the mixture);
    edge bins take the tails.  Data are scaled to [-1, 1] with bin half-width 1/255.

    With a, b the bin edges standardized by (μ, s), an interior bin holds
    σ(b) - σ(a) = σ(b) σ(-a) (1 - e^(a-b)), so its log-mass is taken as
    log σ(b) + log σ(-a) + log(-expm1(a - b)): no difference of CDFs, exact deep in either tail,
    and a - b = -2/(255 s) comes from the scale alone.
    """

    name, params_per_pixel, data_kinds = "discretized_logistic", 2, ("8bit",)

    def prepare(
        self, x: torch.Tensor, *, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return x.to(dtype) / 127.5 - 1.0

    def _log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean, raw = _split(params, 2).unbind(-3)
        log_scale = raw.clamp_min(-7.0)
        inv_scale = torch.exp(-log_scale)
        centred = x - mean
        upper, lower = inv_scale * (centred + 1.0 / 255.0), inv_scale * (centred - 1.0 / 255.0)
        log_first = F.logsigmoid(upper)  # bin x = 0: CDF(upper edge)
        log_last = F.logsigmoid(-lower)  # bin x = 255: 1 - CDF(lower edge)
        a_minus_b = (inv_scale * (-2.0 / 255.0)).clamp_max(-torch.finfo(inv_scale.dtype).tiny)  # s = inf: no log 0
        log_interior = log_first + log_last + torch.log(-torch.expm1(a_minus_b))
        log_p = torch.where(x < -0.999, log_first, torch.where(x > 0.999, log_last, log_interior))
        return log_p.flatten(-3).sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return ((_split(params, 2)[..., 0, :, :] + 1.0) / 2.0).clamp(0.0, 1.0)


def build_likelihood(name: str, data_kind: str) -> Likelihood:
    """The likelihood called ``name``, checked against the data kind it will model."""
    return LIKELIHOODS[name].for_data(data_kind)


def default_likelihood(data_kind: str) -> str:
    return {"binary": "bernoulli", "grayscale": "bernoulli", "8bit": "categorical256"}[data_kind]
