"""Channel-masked convolutions and the convolutional IAF step of Kingma et al. (2016).

A spatial latent z (…, C, H, W) gets a triangular Jacobian when every output channel i reads
only input channels of smaller degree, at any pixel of the kernel window:

    ∂z'_(i, p) / ∂z_(j, q) ≠ 0  only if  deg(j) < deg(i)  or  (j, q) = (i, p).

Ordering the C·H·W coordinates channel-major by degree makes the Jacobian lower triangular with
the diagonal σ_(i, p), so log|det| = Σ_(i, p) log σ_(i, p).  (openai/iaf's ``ar_conv2d`` masks
the kernel window in raster order as well; masking channels only lets each channel read the
whole window of the channels before it, and keeps the inverse to C passes.)

The context (the ResNet VAE's up + down features, (…, Cc, H, W)) is spatial: it enters the first
hidden layer through an unmasked 1x1 convolution, so conditioning never breaks the ordering.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flowvae.flows.base import Flow, check_broadcast
from flowvae.flows.made import input_degrees
from flowvae.numerics import soft_clamp


def hidden_degrees(width: int, channels: int) -> torch.Tensor:
    """Degrees of ``width`` hidden channels, cycling through 1..C−1 (all 0 when C = 1, so they read no input)."""
    if channels == 1:
        return torch.zeros(width, dtype=torch.long)
    return torch.arange(width) % (channels - 1) + 1


class MaskedConv2d(nn.Conv2d):
    """A 'same'-padded convolution whose weight (out, in, k, k) is multiplied by mask[out, in].

    mask[o, i] = 1 iff deg_out[o] ≥ deg_in[i] (``strict=False``, hidden layers) or deg_out[o] > deg_in[i]
    (``strict=True``, the output layer).  The same mask holds at every kernel position, so output
    channel o at pixel p reads input channel i at every pixel of the window or at none.  Masked
    weights start at zero and stay there (the mask also multiplies them in ``forward``).
    """

    mask: torch.Tensor  # a buffer (out, in, 1, 1)

    def __init__(
        self, in_degrees: torch.Tensor, out_degrees: torch.Tensor, kernel_size: int = 3, strict: bool = False
    ) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"MaskedConv2d needs an odd kernel_size, got {kernel_size}")
        super().__init__(len(in_degrees), len(out_degrees), kernel_size, padding=kernel_size // 2)
        allowed = out_degrees[:, None] > in_degrees[None, :] if strict else out_degrees[:, None] >= in_degrees[None, :]
        self.register_buffer("mask", allowed.to(self.weight.dtype)[:, :, None, None])
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


def check_spatial(
    name: str, z: torch.Tensor, channels: int, context: torch.Tensor | None, context_channels: int | None
) -> None:
    """One-line errors unless z is (…, channels, H, W) and the context (…, context_channels, H, W)
    has z's spatial size and a batch shape that broadcasts to z's."""
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(f"{name} expects a floating-point tensor, got {type(z).__name__}")
    if z.dim() < 3 or z.shape[-3] != channels:
        raise ValueError(f"{name} expects z of shape (..., {channels}, H, W), got shape {tuple(z.shape)}")
    if context_channels is None:
        return
    if context is None:
        raise ValueError(f"{name} was built with context_channels={context_channels} and needs a context, got None")
    if context.dim() < 3 or context.shape[-3] != context_channels or context.shape[-2:] != z.shape[-2:]:
        raise ValueError(
            f"{name} expects context of shape (..., {context_channels}, {z.shape[-2]}, {z.shape[-1]}), "
            f"got shape {tuple(context.shape)}"
        )
    check_broadcast(name, context.shape[:-3], z.shape[:-3])


def add_context(hidden: torch.Tensor, batch: torch.Size, projected: torch.Tensor) -> torch.Tensor:
    """hidden (N, D, H, W) with N = prod(batch), plus a projected context (*batch_c, D, H, W) that
    broadcasts to batch: the context is projected before it is broadcast, so K samples sharing
    one context cost one projection."""
    return (hidden.reshape(*batch, *hidden.shape[1:]) + projected).reshape(hidden.shape)


class ConvIAF(Flow):
    """One σ-gated IAF step on a spatial latent (Kingma et al. 2016, eq. 14–15), autoregressive over channels.

        [m, s] = masked-conv-net(z, context),  σ = sigmoid(gate_bias + clamp(s)),
        z' = σ ⊙ z + (1 − σ) ⊙ m,  log|det ∂z'/∂z| = Σ_(C, H, W) log σ.

    The net is masked 3x3 conv → +1x1(context) → ELU → masked 3x3 conv → ELU → masked 3x3 conv
    (2C outputs, strict mask).  Soft clamps keep everything finite: m ∈ (−``shift_bound``,
    ``shift_bound``), and the gate's logit ∈ gate_bias ± ``gate_bound`` (σ ≥ 0.0067 by default,
    so the inverse never divides by zero).  ``gate_bias`` 3 (σ ≈ 0.95) and an output layer scaled
    by 1e-2 start the step near the identity.  Reverse ``order`` between steps.

    Shapes: z (*batch, C, H, W); context (*batch_c, Cc, H, W) with batch_c broadcasting to batch,
    e.g. z (K, B, C, H, W) with context (B, Cc, H, W) or (K, B, Cc, H, W).  ``context_dim`` holds
    Cc (the context is spatial, not a vector).

    >>> step = ConvIAF(4, hidden=16, context_channels=8)
    >>> z, context = torch.randn(2, 3, 4, 5, 5), torch.randn(3, 8, 5, 5)
    >>> z_new, log_abs_det = step(z, context)
    >>> z_new.shape, log_abs_det.shape
    (torch.Size([2, 3, 4, 5, 5]), torch.Size([2, 3]))
    >>> torch.allclose(step.inverse(z_new, context)[0], z, atol=1e-5)
    True
    """

    event_dim = 3
    degrees: torch.Tensor  # a buffer: each channel's degree

    def __init__(
        self,
        channels: int,
        hidden: int,
        context_channels: int | None = None,
        kernel_size: int = 3,
        order: str | Sequence[int] = "natural",
        gate_bias: float = 3.0,
        gate_bound: float = 8.0,
        shift_bound: float = 5.0,
    ) -> None:
        super().__init__()
        if channels < 1 or hidden < 1:
            raise ValueError(f"ConvIAF needs channels >= 1 and hidden >= 1, got channels={channels}, hidden={hidden}")
        if context_channels is not None and context_channels < 1:
            raise ValueError(f"context_channels must be >= 1 or None, got {context_channels}")
        self.channels, self.hidden, self.context_dim = channels, hidden, context_channels
        self.gate_bias, self.gate_bound, self.shift_bound = gate_bias, gate_bound, shift_bound
        self.register_buffer("degrees", input_degrees(channels, order))
        inner = hidden_degrees(hidden, channels)
        self.hidden1 = MaskedConv2d(self.degrees, inner, kernel_size)
        self.hidden2 = MaskedConv2d(inner, inner, kernel_size)
        self.output = MaskedConv2d(inner, self.degrees.repeat(2), kernel_size, strict=True)  # [m; s]
        self.context_layer = (
            nn.Conv2d(context_channels, hidden, 1, bias=False) if context_channels is not None else None
        )
        with torch.no_grad():  # start near the identity
            self.output.weight.mul_(1e-2)
            assert self.output.bias is not None  # MaskedConv2d keeps Conv2d's bias
            self.output.bias.zero_()

    def _gate_and_shift(self, z: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's logit and the clamped shift m, both (*batch, C, H, W) in z's dtype."""
        batch = z.shape[:-3]
        h = self.hidden1(z.reshape(-1, *z.shape[-3:]))
        if self.context_layer is not None:
            assert context is not None  # check_spatial requires it when there is a context layer
            c = self.context_layer(context.reshape(-1, *context.shape[-3:]))
            h = add_context(h, batch, c.reshape(*context.shape[:-3], *c.shape[1:]))
        out = self.output(F.elu(self.hidden2(F.elu(h))))
        m, s = out.reshape(*batch, 2, *z.shape[-3:]).unbind(-4)
        # Under autocast the convolutions may run in 16 bits; the gate and the update use z's dtype.
        m, s = m.to(z.dtype), s.to(z.dtype)
        return self.gate_bias + soft_clamp(s, self.gate_bound), soft_clamp(m, self.shift_bound)

    def forward_elementwise(
        self, z: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z' and the per-element log σ (*batch, C, H, W), whose sum over (C, H, W) is log|det|."""
        check_spatial(type(self).__name__, z, self.channels, context, self.context_dim)
        gate, m = self._gate_and_shift(z, context)
        return torch.lerp(m, z, torch.sigmoid(gate)), F.logsigmoid(gate)  # σ z + (1 − σ) m

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z_new, log_sigma = self.forward_elementwise(z, context)
        return z_new, log_sigma.flatten(-3).sum(-1)

    def forward_per_channel(
        self, z: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z' and the exact log|det| per channel, Σ over (H, W) of log σ: (*batch, C)."""
        z_new, log_sigma = self.forward_elementwise(z, context)
        return z_new, log_sigma.sum((-2, -1))

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve z' = σ(x) ⊙ x + (1 − σ(x)) ⊙ m(x) for x, one channel degree at a time (C net passes).

        Pass d reads x's channels of degree < d (already solved) and writes only the channels of
        degree d: x_d = (z'_d − (1 − σ_d) m_d) / σ_d.  The last pass sees every channel its gates
        read, so its log σ is exact: log|det ∂x/∂z'| = −Σ log σ.
        """
        check_spatial(type(self).__name__, z, self.channels, context, self.context_dim)
        x = torch.zeros_like(z)
        for degree in range(1, self.channels + 1):
            gate, m = self._gate_and_shift(x, context)
            sigma = torch.sigmoid(gate)
            solved = (z - (1.0 - sigma) * m) / sigma
            current = (self.degrees == degree).view(-1, 1, 1)
            x = torch.where(current, solved, x)
        return x, -F.logsigmoid(gate).flatten(-3).sum(-1)
