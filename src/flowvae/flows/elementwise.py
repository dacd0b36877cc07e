"""Amortizable flows of Rezende & Mohamed (2015) and Tomczak & Welling (2016): planar, radial, Householder."""

from __future__ import annotations

import functools

import torch

from flowvae.flows import functional as Fn
from flowvae.flows.base import Flow, FlowParameters, constant_init, normal_init
from flowvae.flows.legacy import read_per_step_layout


class Planar(Flow):
    """``steps`` planar steps f(z) = z + û tanh(wᵀz + b) in a row (Rezende & Mohamed 2015, eq. 10).

    û is constrained so that wᵀû >= -1 (invertible).  Parameters are global, or amortized from
    h when ``context_dim`` is given; the T steps' parameters are stored together (u and w (T, D),
    b (T,), or one head for all T), so that û and 1 + wᵀû are prepared for all steps at once and
    a stack of T steps has 3 parameter tensors, not 3T.  No closed-form inverse.

    Examples:
        >>> import torch
        >>> flow = Planar(dim=2, context_dim=8, steps=4)      # amortized: u, w, b from h
        >>> z, log_abs_det = flow(torch.randn(5, 2), context=torch.randn(5, 8))
        >>> tuple(z.shape), tuple(log_abs_det.shape)
        ((5, 2), (5,))
    """

    def __init__(self, dim: int, context_dim: int | None = None, steps: int = 1) -> None:
        super().__init__()
        self.dim, self.context_dim, self.steps = dim, context_dim, steps
        std = dim**-0.5
        if steps < 1:
            raise ValueError(f"Planar needs steps >= 1, got {steps}")
        self.params = FlowParameters(
            {"u": ((dim,), normal_init(std)), "w": ((dim,), normal_init(std)), "b": ((), constant_init(0.0))},
            context_dim,
            steps if steps > 1 else None,
        )
        self._register_load_state_dict_pre_hook(
            functools.partial(read_per_step_layout, concatenated=("params.head.",)), with_module=True
        )

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.dim, context)
        p = self.params(context)
        if self.steps == 1:
            return Fn.planar(z, p["u"], p["w"], p["b"])
        u_hat, one_plus_wu_hat = Fn.planar_constraint(p["u"], p["w"])
        return Fn.planar_chain(z, u_hat, p["w"], p["b"], one_plus_wu_hat)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, steps={self.steps}, context_dim={self.context_dim}"


class Radial(Flow):
    """Radial flow f(z) = z + β (z - z₀) / (α + ‖z - z₀‖) with α > 0, β >= -α (Rezende & Mohamed 2015).

    Has a closed-form inverse (the radius solves a quadratic).

    Examples:
        >>> import torch
        >>> flow, z0 = Radial(dim=3), torch.randn(4, 3)
        >>> z, log_abs_det = flow(z0)
        >>> back, _ = flow.inverse(z)
        >>> torch.allclose(back, z0, atol=1e-5)
        True
    """

    def __init__(self, dim: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.dim, self.context_dim = dim, context_dim
        self.params = FlowParameters(
            {
                "z0": ((dim,), normal_init(dim**-0.5)),
                "alpha": ((), constant_init(0.0)),
                "beta": ((), constant_init(0.0)),
            },
            context_dim,
        )

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.dim, context)
        p = self.params(context)
        return Fn.radial(z, p["z0"], p["alpha"], p["beta"])

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.dim, context)
        p = self.params(context)
        return Fn.radial_inverse(z, p["z0"], p["alpha"], p["beta"])


class Householder(Flow):
    """Householder flow: ``reflections`` reflections z ← (I - 2vvᵀ/‖v‖²) z (Tomczak & Welling 2016).

    Volume preserving (log|det| = 0); its own inverse up to the order of the reflections.

    Examples:
        >>> import torch
        >>> flow = Householder(dim=4, reflections=2, context_dim=6)    # v from h
        >>> z, log_abs_det = flow(torch.randn(3, 4), context=torch.randn(3, 6))
        >>> log_abs_det
        tensor([0., 0., 0.])
    """

    def __init__(self, dim: int, reflections: int = 1, context_dim: int | None = None) -> None:
        super().__init__()
        self.dim, self.context_dim, self.reflections = dim, context_dim, reflections
        self.params = FlowParameters({"v": ((reflections, dim), normal_init(1.0))}, context_dim)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.dim, context)
        v = self.params(context)["v"]
        for k in range(self.reflections):
            z = Fn.householder(z, v[..., k, :])
        return z, z.new_zeros(self.batch_shape(z))

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.dim, context)
        v = self.params(context)["v"]
        for k in reversed(range(self.reflections)):
            z = Fn.householder(z, v[..., k, :])
        return z, z.new_zeros(self.batch_shape(z))
