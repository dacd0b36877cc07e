"""The optimizers of ``flowvae train``: Adam and Adamax, each with decoupled weight decay
(Loshchilov & Hutter 2019) when ``--weight-decay`` is set."""

from __future__ import annotations

import torch

from flowvae.config import TrainConfig


class AdamaxW(torch.optim.Adamax):
    """Adamax with decoupled weight decay (Loshchilov & Hutter 2019): w ← w · (1 − lr · λ), then the
    Adamax step; λ is each group's ``decoupled_weight_decay`` (torch's Adamax only has L2 decay)."""

    @torch.no_grad()
    def step(self, closure=None):  # torch's signature
        for group in self.param_groups:
            decay = group.get("decoupled_weight_decay", 0.0)
            params = [p for p in group["params"] if p.grad is not None]
            if decay and params:
                torch._foreach_mul_(params, 1.0 - group["lr"] * decay)
        return super().step(closure)


def build_optimizer(config: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Adam or Adamax; ``weight_decay`` is decoupled for both (AdamW's rule; 0: none)."""
    if config.optimizer == "adamax":
        optimizer = AdamaxW(model.parameters(), lr=config.lr, foreach=True)
        set_weight_decay(optimizer, config.weight_decay)
        return optimizer
    return torch.optim.Adam(model.parameters(), lr=config.lr, fused=device.type in ("cpu", "cuda"),
                            weight_decay=config.weight_decay, decoupled_weight_decay=True)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Decoupled weight decay λ in every group (also a resumed run's, whose saved groups hold the old λ)."""
    for group in optimizer.param_groups:
        if isinstance(optimizer, AdamaxW):
            group["decoupled_weight_decay"] = weight_decay
        else:
            group["weight_decay"], group["decoupled_weight_decay"] = weight_decay, True
