"""Masked affine autoregressive flows: IAF (Kingma et al. 2016) and MAF (Papamakarios et al. 2017).

Both are z_out = z_in · exp(log_scale) + shift with (log_scale, shift) from a MADE.  IAF's MADE
reads z_in (one pass to sample, sequential inverse); MAF's reads z_out (one pass for density,
sequential sampling).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from flowvae.flows.base import Flow
from flowvae.flows.legacy import read_per_step_layout
from flowvae.flows.made import MADE, Network
from flowvae.numerics import soft_clamp


def _read_orders(module: _MaskedAffine, *args: object) -> None:
    """Each step's positions in the order of their degrees, read on the host when the module is built
    or loaded, not in every sequential pass (a sync, and a graph break compiled)."""
    module.orders = torch.argsort(module.made.degrees.view(-1, module.dim), dim=-1).tolist()


class _MaskedAffine(Flow):
    """``steps`` such flows in one module (one MADE with stacked weights, see :class:`MADE`), the
    autoregressive order reversed between steps; ``steps=1`` is one step."""

    conditioned_on_output: bool
    orders: list[list[int]]  # per step, the positions in the order of their degrees (see _read_orders)

    def __init__(
        self, dim: int, hidden: Sequence[int], context_dim: int | None, order: str | Sequence[int], steps: int = 1
    ) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"{type(self).__name__} needs steps >= 1, got {steps}")
        self.dim, self.context_dim, self.steps = dim, context_dim, steps
        self.made = MADE(
            dim, hidden, n_params=2, context_dim=context_dim, order=order, steps=steps if steps > 1 else None
        )
        with torch.no_grad():  # start near the identity: (log_scale, shift) ≈ (const, 0)
            self.made.output_layer.weight.mul_(1e-2)
            self.made.output_layer.bias.zero_()
        self._register_load_state_dict_pre_hook(
            functools.partial(read_per_step_layout, concatenated=("made.context_layer.weight",)), with_module=True
        )
        self.register_load_state_dict_post_hook(_read_orders)
        _read_orders(self)

    def _scale_shift(self, made_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_scale, shift) from the MADE's output (..., 2, D)."""
        raise NotImplementedError

    def _one_pass(self, network: Network, z_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale, shift = self._scale_shift(network(z_in))
        return z_in * torch.exp(log_scale) + shift, log_scale.sum(-1)

    def _one_pass_inverse(self, network: Network, z_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale, shift = self._scale_shift(network(z_out))
        return (z_out - shift) * torch.exp(-log_scale), -log_scale.sum(-1)

    def _sequential(
        self, network: Network, order: list[int], z: torch.Tensor, invert: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve the autoregressive equations one degree at a time: D MADE passes.

        Pass d writes only the position of degree d, whose (log_scale, shift) read solved positions
        alone; unsolved positions stay 0, so they never feed values that overflow into the MADE.
        The last pass sees every input its outputs depend on, so its log-scales give the log-det.
        """
        x = torch.zeros_like(z)
        for position in order:
            log_scale, shift = (t.to(z.dtype) for t in self._scale_shift(network(x)))
            z_i, log_scale_i, shift_i = z[..., position], log_scale[..., position], shift[..., position]
            x_i = (z_i - shift_i) * torch.exp(-log_scale_i) if invert else z_i * torch.exp(log_scale_i) + shift_i
            x = torch.cat([x[..., :position], x_i.unsqueeze(-1), x[..., position + 1 :]], dim=-1)
        return x, (-log_scale if invert else log_scale).sum(-1)

    def _run(self, z: torch.Tensor, context: torch.Tensor | None, invert: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.dim, context)
        networks = self.made.networks(context)
        steps = range(self.steps - 1, -1, -1) if invert else range(self.steps)
        log_det = None
        for t in steps:
            if invert == self.conditioned_on_output:
                z, step_log_det = (self._one_pass_inverse if invert else self._one_pass)(networks[t], z)
            else:
                z, step_log_det = self._sequential(networks[t], self.orders[t], z, invert)
            log_det = step_log_det if log_det is None else log_det + step_log_det
        assert log_det is not None  # steps >= 1
        return z, log_det

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(z, context, invert=False)

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(z, context, invert=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, steps={self.steps}, context_dim={self.context_dim}"


class IAF(_MaskedAffine):
    """Inverse autoregressive flow step with the gated update of Kingma et al. (2016), eq. 14-15.

    [m, s] = MADE(z, h);  σ = sigmoid(s + gate_bias);  z ← σ ⊙ z + (1 - σ) ⊙ m;  log|det| = Σ log σ.
    Each step is a convex combination of z and m, and m is clamped to ±``shift_bound``, so
    |z| never grows past max(|z₀|, shift_bound) however deep the stack.  ``gate_bias`` (default 3,
    σ ≈ 0.95) and a near-zero output layer start each step close to the identity.  ``steps=T``:
    T steps in one module, ``order`` reversed between them (one-step modules in a ``Compose``
    take alternating orders from the caller).

    Examples:
        >>> import torch
        >>> flow = IAF(dim=4, hidden=(32, 32), context_dim=8, steps=2)
        >>> z, log_abs_det = flow(torch.randn(6, 4), context=torch.randn(6, 8))
        >>> bool((log_abs_det <= 0).all())     # a gated step only contracts: log σ <= 0
        True
    """

    conditioned_on_output = False

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (320, 320),
        context_dim: int | None = None,
        order: str | Sequence[int] = "natural",
        gate_bias: float = 3.0,
        shift_bound: float = 1e3,
        steps: int = 1,
    ) -> None:
        super().__init__(dim, hidden, context_dim, order, steps)
        self.gate_bias, self.shift_bound = gate_bias, shift_bound

    def _gate_and_shift(self, made_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, s = made_out.unbind(-2)
        # hardtanh is clamp with a one-kernel backward (clamp's takes about seven small operations).
        return s + self.gate_bias, F.hardtanh(m, -self.shift_bound, self.shift_bound)

    def _scale_shift(self, made_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, m = self._gate_and_shift(made_out)
        return F.logsigmoid(s), torch.sigmoid(-s) * m

    def _one_pass(self, network: Network, z_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, m = self._gate_and_shift(network(z_in))
        if s.dtype != z_in.dtype:  # under autocast the MADE's outputs may be 16-bit
            s, m = s.to(z_in.dtype), m.to(z_in.dtype)
        return torch.lerp(m, z_in, torch.sigmoid(s)), F.logsigmoid(s).sum(-1)  # σ z + (1 - σ) m


class MAF(_MaskedAffine):
    """Masked autoregressive flow step (Papamakarios et al. 2017): z_out = z_in · exp(α) + μ,
    [μ, α] = MADE(z_out, h), α soft-clamped to ±``log_scale_bound`` and μ to ±``shift_bound``.
    Density direction (``inverse``) is one pass; sampling (``forward``) takes D passes.
    ``steps=T``: T steps in one module, ``order`` reversed between them.

    Examples:
        >>> import torch
        >>> flow, z = MAF(dim=3, hidden=(16,), steps=2), torch.randn(5, 3)
        >>> z0, log_abs_det = flow.inverse(z)           # the density direction: one pass
        >>> torch.allclose(flow(z0)[0], z, atol=1e-4)
        True
    """

    conditioned_on_output = True

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (320, 320),
        context_dim: int | None = None,
        order: str | Sequence[int] = "natural",
        log_scale_bound: float = 5.0,
        shift_bound: float = 1e3,
        steps: int = 1,
    ) -> None:
        super().__init__(dim, hidden, context_dim, order, steps)
        self.log_scale_bound, self.shift_bound = log_scale_bound, shift_bound

    def _scale_shift(self, made_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, alpha = made_out.unbind(-2)
        return soft_clamp(alpha, self.log_scale_bound), soft_clamp(mu, self.shift_bound)
