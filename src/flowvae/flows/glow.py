"""Glow's building blocks (Kingma & Dhariwal 2018) and RealNVP's affine coupling (Dinh et al. 2017).

Each works on images (``event_dim=3``: z (..., C, H, W), acting on channels, shared over pixels)
or on vectors (``event_dim=1``: z (..., D), acting on features).  The channel axis is ``-event_dim``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flowvae.flows.base import Flow
from flowvae.flows.masked_conv import add_context, check_spatial


def _pixels(z: torch.Tensor, event_dim: int) -> int:
    """Number of positions sharing the per-channel transform: H*W for images, 1 for vectors."""
    return math.prod(z.shape[z.dim() - event_dim + 1 :])


def _check_event_dim(event_dim: int) -> int:
    if event_dim not in (1, 3):
        raise ValueError(f"event_dim must be 1 (vectors) or 3 (images), got {event_dim}")
    return event_dim


class ActNorm(Flow):
    """Per-channel affine y = (x + bias) · exp(log_scale), initialised from the first training batch
    so that outputs have zero mean and unit variance per channel.  log|det| = pixels · Σ log_scale."""

    initialized: torch.Tensor  # a buffer: whether the data-dependent init has run

    def __init__(self, channels: int, event_dim: int = 3) -> None:
        super().__init__()
        self.channels, self.event_dim = channels, _check_event_dim(event_dim)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        # The buffer read on the host once, not every training step (a sync, and a graph break compiled);
        # loading weights reads it again.
        self._known_initialized = False
        self.register_load_state_dict_post_hook(_forget_initialized)

    def _view(self, p: torch.Tensor) -> torch.Tensor:
        return p.view(-1, *([1] * (self.event_dim - 1)))

    @torch.no_grad()
    def _initialize(self, z: torch.Tensor) -> None:
        flat = z.movedim(z.dim() - self.event_dim, -1).reshape(-1, self.channels)
        self.bias.copy_(-flat.mean(0))
        self.log_scale.copy_(-torch.log(flat.std(0, unbiased=False) + 1e-6))
        self.initialized.fill_(True)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.channels, context)
        if self.training and not self._known_initialized:
            if not self.initialized:
                self._initialize(z)
            self._known_initialized = True
        y = (z + self._view(self.bias)) * torch.exp(self._view(self.log_scale))
        ladj = (_pixels(z, self.event_dim) * self.log_scale.sum()).expand(self.batch_shape(z))
        return y, ladj

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.channels, context)
        x = z * torch.exp(-self._view(self.log_scale)) - self._view(self.bias)
        return x, (-_pixels(z, self.event_dim) * self.log_scale.sum()).expand(self.batch_shape(z))


def _forget_initialized(module: ActNorm, incompatible_keys: object) -> None:
    module._known_initialized = False


def _mix_channels(z: torch.Tensor, weight: torch.Tensor, event_dim: int) -> torch.Tensor:
    """Apply a (C, C) matrix to the channel axis of z."""
    axis = z.dim() - event_dim
    return (z.movedim(axis, -1) @ weight.transpose(0, 1)).movedim(-1, axis)


class InvertibleConv1x1(Flow):
    """Invertible 1x1 convolution with an LU-decomposed weight W = P L (U + diag(sign · exp(log_s))).

    log|det| = pixels · Σ log_s.  With ``event_dim=1`` it is an invertible linear map of features.
    """

    permutation: torch.Tensor  # buffers: the fixed factors of the LU parameterisation
    sign_s: torch.Tensor
    lower_mask: torch.Tensor

    def __init__(self, channels: int, event_dim: int = 3) -> None:
        super().__init__()
        self.channels, self.event_dim = channels, _check_event_dim(event_dim)
        q = torch.linalg.qr(torch.randn(channels, channels)).Q
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> torch.Tensor:
        eye = torch.eye(self.channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.channels, context)
        ladj = (_pixels(z, self.event_dim) * self.log_s.sum()).expand(self.batch_shape(z))
        return _mix_channels(z, self.weight(), self.event_dim), ladj

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.channels, context)
        ladj = (-_pixels(z, self.event_dim) * self.log_s.sum()).expand(self.batch_shape(z))
        return _mix_channels(z, torch.linalg.inv(self.weight()), self.event_dim), ladj


class Permute(Flow):
    """A fixed permutation of channels (features for vectors); log|det| = 0.

    ``permutation=None`` draws a random one (seeded by torch's global generator).
    """

    permutation: torch.Tensor  # buffers
    inverse_permutation: torch.Tensor

    def __init__(self, channels: int, permutation: torch.Tensor | None = None, event_dim: int = 1) -> None:
        super().__init__()
        self.channels, self.event_dim = channels, _check_event_dim(event_dim)
        perm = torch.randperm(channels) if permutation is None else torch.as_tensor(permutation, dtype=torch.long)
        if not torch.equal(perm.sort().values, torch.arange(channels)):
            raise ValueError(f"Permute needs a permutation of range({channels}), got {perm.tolist()}")
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.channels, context)
        return z.index_select(z.dim() - self.event_dim, self.permutation), z.new_zeros(self.batch_shape(z))

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.channels, context)
        return z.index_select(z.dim() - self.event_dim, self.inverse_permutation), z.new_zeros(self.batch_shape(z))


class Reverse(Permute):
    """Reverses the order of channels (features for vectors)."""

    def __init__(self, channels: int, event_dim: int = 1) -> None:
        super().__init__(channels, torch.arange(channels - 1, -1, -1), event_dim)


class AffineCoupling(Flow):
    """Affine coupling: x = [x_a, x_b];  y_b = (x_b + t(x_a, h)) · sigmoid(s(x_a, h) + 2);  y_a = x_a.

    The sigmoid(· + 2) scale of Glow keeps the step stable; the last layer of the conditioner
    starts at zero.  log|det| = Σ log sigmoid(s + 2) over the transformed half (and its pixels).
    Vectors use an MLP conditioner, images a 3x3-1x1-3x3 conv net; h enters the first layer.
    ``swap=True`` transforms the first half with the second as condition.
    """

    first: nn.Linear | nn.Conv2d  # the conditioner: linear for vectors, convolutions for images
    middle: nn.Linear | nn.Conv2d
    last: nn.Linear | nn.Conv2d
    context_layer: nn.Linear | nn.Conv2d | None

    def __init__(
        self, channels: int, hidden: int = 256, context_dim: int | None = None, event_dim: int = 1, swap: bool = False
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"AffineCoupling needs at least 2 channels, got {channels}")
        self.channels, self.context_dim, self.event_dim = channels, context_dim, _check_event_dim(event_dim)
        self.swap = swap
        self.split = channels // 2
        n_cond, n_out = (channels - self.split, self.split) if swap else (self.split, channels - self.split)
        self.n_out = n_out
        if event_dim == 1:
            self.first = nn.Linear(n_cond, hidden)
            self.middle = nn.Linear(hidden, hidden)
            self.last = nn.Linear(hidden, 2 * n_out)
        else:
            self.first = nn.Conv2d(n_cond, hidden, 3, padding=1)
            self.middle = nn.Conv2d(hidden, hidden, 1)
            self.last = nn.Conv2d(hidden, 2 * n_out, 3, padding=1)
        nn.init.zeros_(self.last.weight)
        assert self.last.bias is not None  # built with a bias
        nn.init.zeros_(self.last.bias)
        self.context_layer = nn.Linear(context_dim, hidden, bias=False) if context_dim is not None else None

    def _conditioner(self, x_cond: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x_cond.shape[: x_cond.dim() - self.event_dim]
        if self.event_dim == 3:
            x_cond = x_cond.reshape(-1, *x_cond.shape[-3:])
        h = self.first(x_cond)
        if self.context_layer is not None:
            c = self.context_layer(context).expand(*batch, -1)
            h = h + (c.reshape(-1, c.shape[-1], 1, 1) if self.event_dim == 3 else c)
        h = self.last(F.relu(self.middle(F.relu(h))))
        if self.event_dim == 3:
            h = h.reshape(*batch, *h.shape[-3:])
        axis = h.dim() - self.event_dim
        shift, raw = h.split(self.n_out, dim=axis)
        return shift, F.logsigmoid(raw + 2.0)

    def _halves(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        axis = z.dim() - self.event_dim
        a, b = z.split([self.split, self.channels - self.split], dim=axis)
        return (b, a) if self.swap else (a, b)

    def _join(self, cond: torch.Tensor, out: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.cat((out, cond) if self.swap else (cond, out), dim=axis)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.channels, context)
        cond, x = self._halves(z)
        shift, log_scale = self._conditioner(cond, context)
        y = (x + shift) * torch.exp(log_scale)
        ladj = log_scale.flatten(z.dim() - self.event_dim).sum(-1)
        return self._join(cond, y, z.dim() - self.event_dim), ladj

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.channels, context)
        cond, y = self._halves(z)
        shift, log_scale = self._conditioner(cond, context)
        x = y * torch.exp(-log_scale) - shift
        ladj = -log_scale.flatten(z.dim() - self.event_dim).sum(-1)
        return self._join(cond, x, z.dim() - self.event_dim), ladj


class SpatialContextCoupling(AffineCoupling):
    """Glow's affine coupling on (…, C, H, W) whose conditioner also reads a spatial context
    (…, Cc, H, W), through an unmasked 1x1 convolution added to its first hidden layer.

    :class:`AffineCoupling` takes a context vector; the ResNet VAE's context is a feature map.
    Everything else (the 3x3-1x1-3x3 conditioner, sigmoid(s + 2) scale, halves, inverse) is
    AffineCoupling's.

    >>> step = SpatialContextCoupling(4, hidden=8, context_channels=3)
    >>> z_new, log_abs_det = step(torch.randn(2, 4, 5, 5), torch.randn(2, 3, 5, 5))
    >>> z_new.shape, log_abs_det.shape
    (torch.Size([2, 4, 5, 5]), torch.Size([2]))
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
            assert context is not None  # check_spatial requires it when there is a context layer
            c = self.context_layer(context.reshape(-1, *context.shape[-3:]))
            h = add_context(h, batch, c.reshape(*context.shape[:-3], *c.shape[1:]))
        h = self.last(F.relu(self.middle(F.relu(h))))
        shift, raw = h.reshape(*batch, *h.shape[1:]).to(x_cond.dtype).split(self.n_out, dim=-3)
        return shift, F.logsigmoid(raw + 2.0)
