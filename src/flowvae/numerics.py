"""Small, numerically careful building blocks shared by the flows.

Each function states the constraint it enforces and where it comes from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """log(x) for x >= 0, with x floored at the dtype's smallest normal number.

    Used for Jacobian determinants that are positive by construction but can underflow to 0.
    Exact whenever x is representable as a normal number.
    """
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def soft_clamp(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Smoothly squash x into (-bound, bound): ``bound * tanh(x / bound)``; identity near 0."""
    return bound * torch.tanh(x / bound)


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log(cosh(x)) without overflow: |x| + softplus(-2|x|) - log 2."""
    a = x.abs()
    return a + F.softplus(-2.0 * a) - math.log(2.0)


def tanh_derivative(x: torch.Tensor) -> torch.Tensor:
    """d tanh(x) / dx = 1 - tanh(x)^2, computed as exp(-2 log cosh x) to keep precision at large |x|."""
    return torch.exp(-2.0 * log_cosh(x))


def radial_parameters(alpha_raw: torch.Tensor, beta_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, β) with α > 0 and β >= -α, the radial flow's invertibility condition.

    Rezende & Mohamed (2015), appendix A.2: α = softplus(α'), β = -α + softplus(β').
    """
    alpha = F.softplus(alpha_raw)
    return alpha, -alpha + F.softplus(beta_raw)


def soft_bound(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Smoothly squash x into (low, high): centre + soft_clamp(x − centre, half-width); identity near the centre."""
    centre, half = (low + high) / 2, (high - low) / 2
    return centre + soft_clamp(x - centre, half)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Densities are summed in at least float32, also when autocast ran the networks in 16 bits."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
