"""The optimizers of ``flowvae train``: Adam and Adamax, each with decoupled weight decay
(Loshchilov & Hutter 2019) when ``--weight-decay`` is set.

:data:`OPTIMIZERS` maps ``--optimizer NAME`` to a builder ``(parameters, lr, weight_decay, device) ->
Optimizer``; a new optimizer registers here, and the configuration's checks read the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from flowvae.registry import Registry

if TYPE_CHECKING:  # config.py reads OPTIMIZERS from here
    from flowvae.config import TrainConfig

OptimizerBuilder = Callable[[Iterable[torch.nn.Parameter], float, float, torch.device], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")


class AdamaxW(torch.optim.Adamax):
    """Adamax with decoupled weight decay (Loshchilov & Hutter 2019): w ← w · (1 − lr · λ), then the
    Adamax step; λ is each group's ``decoupled_weight_decay`` (torch's Adamax only has L2 decay)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # torch's signature
        for group in self.param_groups:
            decay = group.get("decoupled_weight_decay", 0.0)
            params = [p for p in group["params"] if p.grad is not None]
            if decay and params:
                torch._foreach_mul_(params, 1.0 - group["lr"] * decay)
        return super().step(closure)


@OPTIMIZERS.register("adam")
def _adam(
    parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        parameters, lr=lr, fused=device.type in ("cpu", "cuda"), weight_decay=weight_decay, decoupled_weight_decay=True
    )


@OPTIMIZERS.register("adamax")
def _adamax(
    parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    optimizer = AdamaxW(parameters, lr=lr, foreach=True)
    set_weight_decay(optimizer, weight_decay)
    return optimizer


def build_optimizer(config: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names (Adam or Adamax); ``weight_decay`` is decoupled for
    both (AdamW's rule; 0: none)."""
    return OPTIMIZERS[config.optimizer](model.parameters(), config.lr, config.weight_decay, device)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Decoupled weight decay λ in every group (also a resumed run's, whose saved groups hold the old λ)."""
    for group in optimizer.param_groups:
        if isinstance(optimizer, AdamaxW):
            group["decoupled_weight_decay"] = weight_decay
        else:
            group["weight_decay"], group["decoupled_weight_decay"] = weight_decay, True
