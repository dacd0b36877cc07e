"""MADE: masked autoencoder for distribution estimation (Germain et al. 2015)."""

from __future__ import annotations

import functools
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
    """nn.Linear whose weight is multiplied by a fixed 0/1 mask of shape (out, in)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked MLP whose ``n_params`` outputs per dimension are autoregressive in the inputs.

    ``forward(x, context=None)``: x (..., D), context (..., context_dim) -> (..., n_params, D);
    output [..., p, i] depends only on inputs of degree < degree(i) (and on the context, which
    enters the first hidden layer unmasked).  Hidden degrees cycle through 1..D-1.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (256, 256), n_params: int = 2,
                 context_dim: int | None = None, order: str | Sequence[int] = "natural",
                 activation: Callable[[], nn.Module] = functools.partial(nn.ELU, inplace=True)) -> None:
        super().__init__()
        if dim < 1 or not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"MADE needs dim >= 1 and non-empty positive hidden sizes, got dim={dim}, hidden={hidden}")
        self.dim, self.n_params, self.context_dim = dim, n_params, context_dim
        self.register_buffer("degrees", input_degrees(dim, order))
        degrees = [self.degrees]
        for width in hidden:
            degrees.append(torch.arange(width) % max(dim - 1, 1) + 1 if dim > 1 else torch.zeros(width, dtype=torch.long))
        layers = []
        for d_in, d_out in zip(degrees[:-1], degrees[1:]):
            layers.append(MaskedLinear(len(d_in), len(d_out), (d_out[:, None] >= d_in[None, :]).float()))
        self.hidden_layers = nn.ModuleList(layers)
        out_degrees = self.degrees.repeat(n_params)
        self.output_layer = MaskedLinear(hidden[-1], n_params * dim, (out_degrees[:, None] > degrees[-1][None, :]).float())
        self.context_layer = nn.Linear(context_dim, hidden[0], bias=False) if context_dim is not None else None
        self.activation = activation()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden_layers[0](x)
        if self.context_layer is not None:
            c = self.context_layer(context)
            # In place where h already has the broadcast shape (one large temporary less per pass).
            h = h.add_(c) if torch.broadcast_shapes(h.shape, c.shape) == h.shape else h + c
        h = self.activation(h)
        for layer in self.hidden_layers[1:]:
            h = self.activation(layer(h))
        return self.output_layer(h).unflatten(-1, (self.n_params, self.dim))


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
