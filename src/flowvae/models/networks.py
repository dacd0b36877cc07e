"""Encoder bodies and decoders: MLP, plain convolutional, and the gated convolutions of van den Berg et al. (2018).

An encoder body maps x (B, C, H, W) to features h (B, feature_dim); a decoder maps z (N, D) to
likelihood parameters (N, P·C, H, W) where P is the likelihood's number of parameters per pixel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flowvae.flows.made import MADE, MaskedLinear


def _downsampled(size: int, times: int) -> list[int]:
    """Spatial sizes after ``times`` stride-2, kernel-5, padding-2 convolutions: ceil(s/2) each."""
    sizes = [size]
    for _ in range(times):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


ACTIVATIONS = ("elu", "gated")


class GatedLinear(nn.Module):
    """h = Linear_h(x) ⊙ sigmoid(Linear_g(x)), the gated dense layer of the VampPrior and Sylvester
    code (Tomczak & Welling 2018; van den Berg et al. 2018), as one (…, 2·out) product."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g = self.linear(x).chunk(2, dim=-1)
        return h * torch.sigmoid(g)


def hidden_layer(in_features: int, out_features: int, activation: str = "elu", dropout: float = 0.0) -> list[nn.Module]:
    """One hidden layer of an MLP: Linear+ELU or :class:`GatedLinear`, then Dropout(p) if p > 0."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = (
        [nn.Linear(in_features, out_features), nn.ELU(inplace=True)]  # in place: one pass less
        if activation == "elu"
        else [GatedLinear(in_features, out_features)]
    )
    return layers + ([nn.Dropout(dropout)] if dropout > 0 else [])


class MLPEncoder(nn.Module):
    """x (B, C, H, W) -> h (B, hidden[-1]) through hidden layers (Linear+ELU or gated, optional dropout)."""

    def __init__(
        self,
        image_shape: Sequence[int],
        hidden: Sequence[int] = (300, 300),
        activation: str = "elu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(image_shape)
        for h in hidden:
            layers += hidden_layer(width, h, activation, dropout)
            width = h
        self.net = nn.Sequential(*layers)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    """z (N, D) -> parameters (N, P·C, H, W) through hidden layers (Linear+ELU or gated, optional dropout)."""

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int],
        params_per_pixel: int,
        hidden: Sequence[int] = (300, 300),
        activation: str = "elu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        layers: list[nn.Module] = []
        width = latent_dim
        for size in hidden:
            layers += hidden_layer(width, size, activation, dropout)
            width = size
        layers += [nn.Linear(width, params_per_pixel * c * h * w), nn.Unflatten(-1, (params_per_pixel * c, h, w))]
        self.net = nn.Sequential(*layers)

    @property
    def output(self) -> nn.Linear:
        """The last layer, whose bias is the parameters at zero hidden activity."""
        return self.net[-2]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class AutoregressivePixels(nn.Module):
    """A term that makes a dense decoder's Bernoulli logits autoregressive over the pixels, in raster
    order: logit_i = a_i(h) + m_i(x_<i, h) + Σ_{j<i} V_ij x_j, where a(h) is the decoder's output layer
    on its last hidden features h, m a one-hidden-layer MADE (Germain et al. 2015) over the P pixels
    that also reads h (hidden degrees spread over 1..P-1), and V a strictly lower-triangular matrix:
    MADE's direct connections, through which every logit reads every earlier pixel, the nearest
    ones too, however narrow the hidden layer.

    ``forward(x, h)`` gives m + V x for x (B, P) in {0, 1} and h (…, B, H), as (…, B, P); both start
    at zero, so a fresh model decodes as its plain decoder.
    """

    def __init__(self, pixels: int, context_dim: int, hidden: int) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"the autoregressive decoder needs hidden >= 1 units, got {hidden}")
        self.made = MADE(pixels, (hidden,), n_params=1, context_dim=context_dim, spread_degrees=True)
        self.direct = MaskedLinear(pixels, pixels, torch.ones(pixels, pixels).tril(-1))
        del self.direct.bias  # the decoder's output layer has the bias
        self.direct.register_parameter("bias", None)
        with torch.no_grad():
            for weight in (self.made.output_layer.weight, self.made.output_layer.bias, self.direct.weight):
                weight.zero_()

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.made(x, h).squeeze(-2) + self.direct(x)


class RasterMaskedConv2d(nn.Conv2d):
    """A 'same'-padded convolution of single-plane features whose k×k window reads only the pixels
    before its centre in raster order (the rows above, and the same row to the left): PixelCNN's
    mask 'A' (van den Oord et al. 2016); with ``include_centre`` its mask 'B', for the layers after
    the first, whose features at the centre already depend on earlier pixels only."""

    mask: torch.Tensor  # a buffer (1, 1, k, k)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, include_centre: bool) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"RasterMaskedConv2d needs an odd kernel_size, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        centre = kernel_size // 2
        mask = torch.ones(kernel_size, kernel_size)
        mask[centre, centre + int(include_centre) :] = 0
        mask[centre + 1 :] = 0
        self.register_buffer("mask", mask[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class LocalAutoregression(nn.Module):
    """A PixelCNN-style term b(x) (B, H·W) for single-channel images x (B, 1, H, W): a 5×5 mask-'A'
    convolution to ``channels`` features, ``layers`` − 1 3×3 mask-'B' convolutions (ELU between),
    then a 1×1 convolution to one logit term per pixel, so b_i reads only x_<i, from a window of the
    rows above and the pixels to the left (a receptive field of 3 + 2·layers pixels across).  Its
    weights are shared over the image, so it adds a few thousand parameters however large the image.
    The output layer starts at zero.

    ``conditioned``: the last hidden layer also reads each pixel's logit l_i from the decoder,
    b_i = w · ELU(u_i(x) + s ⊙ l_i) + c with u_i(x) that layer's pre-activation and s (channels,)
    learned from zero, so the term can depend on what the latents say about the pixel (a nonlinear
    mix instead of a sum).  u(x) is computed once per image; only the 1×1 layer runs per sample.
    """

    def __init__(self, channels: int = 32, layers: int = 2, conditioned: bool = False) -> None:
        super().__init__()
        if channels < 1 or layers < 1:
            raise ValueError(f"the local autoregression needs channels and layers >= 1, got {channels}, {layers}")
        convs: list[nn.Module] = [RasterMaskedConv2d(1, channels, 5, include_centre=False), nn.ELU()]
        for _ in range(layers - 1):
            convs += [RasterMaskedConv2d(channels, channels, 3, include_centre=True), nn.ELU()]
        output = nn.Conv2d(channels, 1, 1)
        with torch.no_grad():
            output.weight.zero_()
            output.bias.zero_()
        self.net = nn.Sequential(*convs, output)
        self.logit_scale = nn.Parameter(torch.zeros(channels)) if conditioned else None

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 1, H, W) -> b (B, H·W); conditioned, also the decoder's logits (…, B, H·W) -> (…, B, H·W)."""
        if self.logit_scale is None:
            return self.net(x).flatten(1)
        if logits is None:
            raise ValueError("the conditioned PixelCNN term reads the decoder's logits: pass them")
        hidden = self.net[:-2](x).flatten(2)  # (B, C, P), the last hidden layer before its ELU
        output = self.net[-1]
        if torch.compiler.is_compiling():  # inductor fuses the mix with the channel sum; eager takes the loop
            mixed = F.elu(hidden + logits.unsqueeze(-2) * self.logit_scale[:, None])
            return (mixed * output.weight.flatten()[:, None]).sum(-2) + output.bias
        term = output.bias.expand(logits.shape)
        # One (…, B, P) temporary at a time, not (…, B, C, P); unbind, not hidden[:, c], so that the
        # backward pass stacks the C gradients once instead of filling and adding C zero tensors.
        for u, scale, weight in zip(hidden.unbind(1), self.logit_scale.unbind(), output.weight.flatten().unbind()):
            term = torch.addcmul(term, F.elu(torch.addcmul(u, logits, scale)), weight)
        return term


@torch.no_grad()
def sample_autoregressively(
    logits: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw binary x (n, P) pixel by pixel in raster order, where ``logits(x)`` (n, P) gives each
    pixel's logit given the pixels before it (``pixels``: an (n, P) tensor whose shape, dtype and
    device x takes); one call per pixel.  Returns x and each pixel's probability under the drawn
    prefix, (n, P)."""
    x = torch.zeros_like(pixels)
    probs = torch.empty_like(x)
    for i in range(x.shape[-1]):
        p = torch.sigmoid(logits(x)[:, i])
        probs[:, i] = p
        x[:, i] = torch.bernoulli(p, generator=generator)
    return x, probs


class ConvEncoder(nn.Module):
    """Two stride-2 5x5 convolutions (32, 64 channels, ELU) then a linear layer to ``feature_dim``."""

    def __init__(self, image_shape: Sequence[int], feature_dim: int = 256) -> None:
        super().__init__()
        c, h, w = image_shape
        hs, ws = _downsampled(h, 2), _downsampled(w, 2)
        self.net = nn.Sequential(
            nn.Conv2d(c, 32, 5, 2, 2),
            nn.ELU(),
            nn.Conv2d(32, 64, 5, 2, 2),
            nn.ELU(),
            nn.Flatten(),
            nn.Linear(64 * hs[-1] * ws[-1], feature_dim),
            nn.ELU(),
        )
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: linear to 64 maps, two stride-2 transposed convolutions."""

    def __init__(self, latent_dim: int, image_shape: Sequence[int], params_per_pixel: int) -> None:
        super().__init__()
        c, h, w = image_shape
        hs, ws = _downsampled(h, 2), _downsampled(w, 2)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 64 * hs[2] * ws[2]),
            nn.ELU(),
            nn.Unflatten(-1, (64, hs[2], ws[2])),
            nn.ConvTranspose2d(64, 32, 5, 2, 2, output_padding=(hs[1] - 2 * hs[2] + 1, ws[1] - 2 * ws[2] + 1)),
            nn.ELU(),
            nn.ConvTranspose2d(
                32, params_per_pixel * c, 5, 2, 2, output_padding=(hs[0] - 2 * hs[1] + 1, ws[0] - 2 * ws[1] + 1)
            ),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


Size2 = int | tuple[int, int]
"""A convolution's kernel size, stride or padding: one int for both axes, or (height, width)."""


class GatedConv2d(nn.Module):
    """h = conv_h(x) ⊙ sigmoid(conv_g(x)) (Dauphin et al. 2017; van den Berg et al. 2018)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Size2, stride: Size2 = 1, padding: Size2 = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 2 * out_channels, kernel_size, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g = self.conv(x).chunk(2, dim=1)
        return h * torch.sigmoid(g)


class GatedConvTranspose2d(nn.Module):
    """Transposed-convolution twin of :class:`GatedConv2d`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size2,
        stride: Size2 = 1,
        padding: Size2 = 0,
        output_padding: Size2 = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, 2 * out_channels, kernel_size, stride, padding, output_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g = self.conv(x).chunk(2, dim=1)
        return h * torch.sigmoid(g)


class GatedConvEncoder(nn.Module):
    """van den Berg et al. (2018): six gated convolutions 32-32-64-64-64-``feature_dim`` (5x5, two of
    stride 2), the last one's kernel covering the remaining map, giving h (B, feature_dim)."""

    def __init__(self, image_shape: Sequence[int], feature_dim: int = 256) -> None:
        super().__init__()
        c, h, w = image_shape
        last = (_downsampled(h, 2)[-1], _downsampled(w, 2)[-1])
        self.net = nn.Sequential(
            GatedConv2d(c, 32, 5, 1, 2),
            GatedConv2d(32, 32, 5, 2, 2),
            GatedConv2d(32, 64, 5, 1, 2),
            GatedConv2d(64, 64, 5, 2, 2),
            GatedConv2d(64, 64, 5, 1, 2),
            GatedConv2d(64, feature_dim, last, 1, 0),
            nn.Flatten(),
        )
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GatedConvDecoder(nn.Module):
    """van den Berg et al. (2018)'s decoder: gated transposed convolutions 64-64-32-32-32, a gated
    convolution, and a 1x1 convolution to the likelihood's parameters."""

    def __init__(self, latent_dim: int, image_shape: Sequence[int], params_per_pixel: int) -> None:
        super().__init__()
        c, h, w = image_shape
        hs, ws = _downsampled(h, 2), _downsampled(w, 2)
        self.net = nn.Sequential(
            nn.Unflatten(-1, (latent_dim, 1, 1)),
            GatedConvTranspose2d(latent_dim, 64, (hs[2], ws[2]), 1, 0),
            GatedConvTranspose2d(64, 64, 5, 1, 2),
            GatedConvTranspose2d(64, 32, 5, 2, 2, (hs[1] - 2 * hs[2] + 1, ws[1] - 2 * ws[2] + 1)),
            GatedConvTranspose2d(32, 32, 5, 1, 2),
            GatedConvTranspose2d(32, 32, 5, 2, 2, (hs[0] - 2 * hs[1] + 1, ws[0] - 2 * ws[1] + 1)),
            GatedConv2d(32, 32, 5, 1, 2),
            nn.Conv2d(32, params_per_pixel * c, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
