"""Masked affine autoregressive flows: IAF (Kingma et al. 2016) and MAF (Papamakarios et al. 2017).

Both are z_out = z_in · exp(log_scale) + shift with (log_scale, shift) from a MADE.  IAF's MADE
reads z_in (one pass to sample, sequential inverse); MAF's reads z_out (one pass for density,
sequential sampling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from flowvae.flows.base import Flow
from flowvae.flows.made import MADE
from flowvae.numerics import soft_clamp


class _MaskedAffine(Flow):
    conditioned_on_output: bool

    def __init__(self, dim: int, hidden: Sequence[int], context_dim: int | None, order: str | Sequence[int]) -> None:
        super().__init__()
        self.dim, self.context_dim = dim, context_dim
        self.made = MADE(dim, hidden, n_params=2, context_dim=context_dim, order=order)
        with torch.no_grad():  # start near the identity: (log_scale, shift) ≈ (const, 0)
            self.made.output_layer.weight.mul_(1e-2)
            self.made.output_layer.bias.zero_()

    def _scale_shift(self, z: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _one_pass(self, z_in, context):
        log_scale, shift = self._scale_shift(z_in, context)
        return z_in * torch.exp(log_scale) + shift, log_scale.sum(-1)

    def _one_pass_inverse(self, z_out, context):
        log_scale, shift = self._scale_shift(z_out, context)
        return (z_out - shift) * torch.exp(-log_scale), -log_scale.sum(-1)

    def _sequential(self, z: torch.Tensor, context: torch.Tensor | None, invert: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve the autoregressive equations one degree at a time: D MADE passes.

        Pass d writes only the position of degree d, whose (log_scale, shift) read solved positions
        alone; unsolved positions stay 0, so they never feed values that overflow into the MADE.
        The last pass sees every input its outputs depend on, so its log-scales give the log-det.
        """
        x = torch.zeros_like(z)
        for position in torch.argsort(self.made.degrees).tolist():
            log_scale, shift = (t.to(z.dtype) for t in self._scale_shift(x, context))
            z_i, log_scale_i, shift_i = z[..., position], log_scale[..., position], shift[..., position]
            x_i = (z_i - shift_i) * torch.exp(-log_scale_i) if invert else z_i * torch.exp(log_scale_i) + shift_i
            x = torch.cat([x[..., :position], x_i.unsqueeze(-1), x[..., position + 1:]], dim=-1)
        return x, (-log_scale if invert else log_scale).sum(-1)

    def forward(self, z, context=None):
        self._check(z, self.dim, context)
        if self.conditioned_on_output:
            return self._sequential(z, context, invert=False)
        return self._one_pass(z, context)

    def inverse(self, z, context=None):
        self._check(z, self.dim, context)
        if self.conditioned_on_output:
            return self._one_pass_inverse(z, context)
        return self._sequential(z, context, invert=True)


class IAF(_MaskedAffine):
    """Inverse autoregressive flow step with the gated update of Kingma et al. (2016), eq. 14-15.

    [m, s] = MADE(z, h);  σ = sigmoid(s + gate_bias);  z ← σ ⊙ z + (1 - σ) ⊙ m;  log|det| = Σ log σ.
    Each step is a convex combination of z and m, and m is clamped to ±``shift_bound``, so
    |z| never grows past max(|z₀|, shift_bound) however deep the stack.  ``gate_bias`` (default 3,
    σ ≈ 0.95) and a near-zero output layer start each step close to the identity.  Reverse
    ``order`` between steps.
    """

    conditioned_on_output = False

    def __init__(self, dim: int, hidden: Sequence[int] = (320, 320), context_dim: int | None = None,
                 order: str | Sequence[int] = "natural", gate_bias: float = 3.0, shift_bound: float = 1e3) -> None:
        super().__init__(dim, hidden, context_dim, order)
        self.gate_bias, self.shift_bound = gate_bias, shift_bound

    def _gate_and_shift(self, z, context):
        m, s = self.made(z, context).unbind(-2)
        # hardtanh is clamp with a one-kernel backward (clamp's takes about seven small operations).
        return s + self.gate_bias, F.hardtanh(m, -self.shift_bound, self.shift_bound)

    def _scale_shift(self, z, context):
        s, m = self._gate_and_shift(z, context)
        return F.logsigmoid(s), torch.sigmoid(-s) * m

    def _one_pass(self, z_in, context):
        s, m = self._gate_and_shift(z_in, context)
        if s.dtype != z_in.dtype:  # under autocast the MADE's outputs may be 16-bit
            s, m = s.to(z_in.dtype), m.to(z_in.dtype)
        return torch.lerp(m, z_in, torch.sigmoid(s)), F.logsigmoid(s).sum(-1)  # σ z + (1 - σ) m


class MAF(_MaskedAffine):
    """Masked autoregressive flow step (Papamakarios et al. 2017): z_out = z_in · exp(α) + μ,
    [μ, α] = MADE(z_out, h), α soft-clamped to ±``log_scale_bound`` and μ to ±``shift_bound``.
    Density direction (``inverse``) is one pass; sampling (``forward``) takes D passes.
    """

    conditioned_on_output = True

    def __init__(self, dim: int, hidden: Sequence[int] = (320, 320), context_dim: int | None = None,
                 order: str | Sequence[int] = "natural", log_scale_bound: float = 5.0,
                 shift_bound: float = 1e3) -> None:
        super().__init__(dim, hidden, context_dim, order)
        self.log_scale_bound, self.shift_bound = log_scale_bound, shift_bound

    def _scale_shift(self, z, context):
        mu, alpha = self.made(z, context).unbind(-2)
        return soft_clamp(alpha, self.log_scale_bound), soft_clamp(mu, self.shift_bound)
