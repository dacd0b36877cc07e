"""Weight normalisation with data-dependent initialisation (Salimans & Kingma 2016), as openai/iaf uses it.

:func:`weight_normed` wraps a convolution (w = g · v / ‖v‖ per output channel) and declares the
standard deviation its outputs should have; :func:`initialise` sets g and the bias of every such
layer from one forward pass of a model over a batch.  A model that uses them calls
:func:`initialise` from its :meth:`~flowvae.models.base.LatentVariableModel.initialise`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from flowvae.models.base import LatentVariableModel, draw_noise

V_INIT_STD = 0.05  # initial std of the weight-norm directions v (openai/iaf)


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


def _data_init_hook(done: set[nn.Module]) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
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
