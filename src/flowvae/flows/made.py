"""MADE: masked autoencoder for distribution estimation (Germain et al. 2015)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def input_degrees(dim: int, order: str | Sequence[int] = "natural") -> torch.Tensor:
    """Degree (1..D) of each input: output i may depend only on inputs of smaller degree.

    ``order`` is 'natural', 'reversed', or a permutation listing the variables from first to last.
    """
    if isinstance(order, str):
        if order == "natural":
            return torch.arange(1, dim + 1)
        if order == "reversed":
            return torch.arange(dim, 0, -1)
        raise ValueError(f"order must be 'natural', 'reversed' or a permutation, got {order!r}")
    perm = torch.as_tensor(list(order), dtype=torch.long)
    if perm.shape != (dim,) or not torch.equal(perm.sort().values, torch.arange(dim)):
        raise ValueError(f"order must be a permutation of range({dim}), got {list(order)}")
    degrees = torch.empty(dim, dtype=torch.long)
    degrees[perm] = torch.arange(1, dim + 1)
    return degrees


class MaskedLinear(nn.Linear):
    """nn.Linear whose weight is multiplied by a fixed 0/1 mask of shape (out, in).

    With a mask of shape (T, out, in) it holds T such layers: weight (T, out, in), bias (T, out),
    used through :meth:`masked_weight` (one MADE of a stack each); layer t is initialised as
    ``nn.Linear`` would be, in the order :meth:`reset_step` is called.
    """

    mask: torch.Tensor  # a buffer

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor) -> None:
        steps = mask.shape[:-2]
        if not steps:
            super().__init__(in_features, out_features)
        else:  # parameters of the full shape, filled step by step by reset_step
            nn.Module.__init__(self)
            self.in_features, self.out_features = in_features, out_features
            self.weight = nn.Parameter(torch.empty(*steps, out_features, in_features))
            self.bias = nn.Parameter(torch.empty(*steps, out_features))
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def reset_step(self, step: int) -> None:
        """Initialise layer ``step`` of a stacked layer as ``nn.Linear`` initialises its own."""
        nn.init.kaiming_uniform_(self.weight[step], a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
        nn.init.uniform_(self.bias[step], -bound, bound)

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() != 2:
            raise ValueError("a stacked MaskedLinear holds several layers: use masked_weight()")
        return F.linear(x, self.masked_weight(), self.bias)


Network = Callable[[torch.Tensor], torch.Tensor]


class MADE(nn.Module):
    """Masked MLP whose ``n_params`` outputs per dimension are autoregressive in the inputs.

    ``forward(x, context=None)``: x (..., D), context (..., context_dim) -> (..., n_params, D);
    output [..., p, i] depends only on inputs of degree < degree(i) (and on the context, which
    enters the first hidden layer unmasked).  Hidden degrees cycle through 1..D-1; with
    ``spread_degrees`` they are spread evenly over 1..D-1 instead, so that a layer narrower than D - 1
    still lets every output read every earlier input (e.g. the pixels of an image).

    ``steps=T`` holds T such networks, as a flow stack needs them, with each layer's weights
    stacked (T, out, in) so that a stack has a few large tensors instead of many small ones:
    network t has ``order`` for even t and its reverse for odd t; ``degrees`` is then (T, D), and
    :meth:`networks` gives the T forward functions.
    """

    degrees: torch.Tensor  # a buffer, (D,) or (T, D)

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (256, 256),
        n_params: int = 2,
        context_dim: int | None = None,
        order: str | Sequence[int] = "natural",
        activation: Callable[[], nn.Module] = functools.partial(nn.ELU, inplace=True),
        steps: int | None = None,
        spread_degrees: bool = False,
    ) -> None:
        super().__init__()
        if dim < 1 or not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"MADE needs dim >= 1 and non-empty positive hidden sizes, got dim={dim}, hidden={hidden}")
        if steps is not None and steps < 1:
            raise ValueError(f"MADE needs steps >= 1 (or None), got {steps}")
        self.dim, self.n_params, self.context_dim, self.steps = dim, n_params, context_dim, steps
        first = input_degrees(dim, order)
        self.register_buffer(
            "degrees",
            first if steps is None else torch.stack([first if t % 2 == 0 else dim + 1 - first for t in range(steps)]),
        )
        stack = () if steps is None else (steps,)
        degrees = [self.degrees]
        for width in hidden:
            if dim == 1:
                hidden_degrees = torch.zeros(width, dtype=torch.long)
            elif spread_degrees:
                hidden_degrees = torch.arange(width) * (dim - 1) // width + 1
            else:
                hidden_degrees = torch.arange(width) % (dim - 1) + 1
            degrees.append(hidden_degrees.expand(*stack, width))
        layers = []
        for d_in, d_out in zip(degrees[:-1], degrees[1:]):
            layers.append(
                MaskedLinear(d_in.shape[-1], d_out.shape[-1], (d_out[..., :, None] >= d_in[..., None, :]).float())
            )
        self.hidden_layers = nn.ModuleList(layers)
        out_degrees = self.degrees.repeat(*(1,) * len(stack), n_params)
        self.output_layer = MaskedLinear(
            hidden[-1], n_params * dim, (out_degrees[..., :, None] > degrees[-1][..., None, :]).float()
        )
        # With steps, one linear map h -> (T·H) for all T networks: rows t·H..(t+1)·H are network t's.
        self.context_layer = (
            None
            if context_dim is None
            else nn.utils.skip_init(nn.Linear, context_dim, hidden[0] * (steps or 1), bias=False)
        )
        for t in range(steps or 1):  # in the order T one-network MADEs draw their initial weights
            if steps is not None:
                for layer in (*self.hidden_layers, self.output_layer):
                    layer.reset_step(t)
            if self.context_layer is not None:
                nn.init.kaiming_uniform_(self.context_layer.weight[t * hidden[0] : (t + 1) * hidden[0]], a=math.sqrt(5))
        self.activation = activation()

    def networks(self, context: torch.Tensor | None = None) -> list[Network]:
        """The forward functions x (..., D) -> (..., n_params, D) of the T networks (one without
        ``steps``), for this context: masks applied and the context projected once for all."""
        layers = (*self.hidden_layers, self.output_layer)
        weights, biases = [layer.masked_weight() for layer in layers], [layer.bias for layer in layers]
        projected: list[torch.Tensor | None] = [None] * (self.steps or 1)
        if self.context_layer is not None:  # one product for all T networks, then T slices (..., H)
            projected = list(self.context_layer(context).unflatten(-1, (self.steps or 1, -1)).unbind(-2))
        if self.steps is None:
            return [functools.partial(self._run, weights, biases, projected[0])]
        per_step = zip(zip(*(w.unbind(0) for w in weights)), zip(*(b.unbind(0) for b in biases)), projected)
        return [functools.partial(self._run, w, b, c) for w, b, c in per_step]

    def _run(
        self,
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor],
        context_term: torch.Tensor | None,
        x: torch.Tensor,
    ) -> torch.Tensor:
        h = F.linear(x, weights[0], biases[0])
        if context_term is not None:
            # In place where h already has the broadcast shape (one large temporary less per pass).
            in_place = torch.broadcast_shapes(h.shape, context_term.shape) == h.shape
            h = h.add_(context_term) if in_place else h + context_term
        h = self.activation(h)
        for weight, bias in zip(weights[1:-1], biases[1:-1]):
            h = self.activation(F.linear(h, weight, bias))
        return F.linear(h, weights[-1], biases[-1]).unflatten(-1, (self.n_params, self.dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.steps is not None:
            raise ValueError(f"this MADE holds {self.steps} networks: call networks(context)[t](x)")
        return self.networks(context)[0](x)


class BernoulliMADE(nn.Module):
    """MADE as a density model of binary vectors: p(x) = Π_i Bernoulli(x_i | σ(logit_i(x_<i)))."""

    def __init__(self, dim: int, hidden: Sequence[int] = (500,), order: str | Sequence[int] = "natural") -> None:
        super().__init__()
        self.made = MADE(dim, hidden, n_params=1, order=order)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) in {0,1} -> log p(x) (...)."""
        logits = self.made(x).squeeze(-2)
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Draw n samples (n, D), one MADE pass per dimension in autoregressive order."""
        weight = self.made.output_layer.weight
        x = weight.new_zeros(n, self.made.dim)
        for position in torch.argsort(self.made.degrees):
            logits = self.made(x).squeeze(-2)
            x[:, position] = torch.bernoulli(torch.sigmoid(logits[:, position]))
        return x
