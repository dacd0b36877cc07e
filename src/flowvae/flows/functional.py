"""Stateless flow maths: each function maps z and explicit parameters to ``(z_new, log_abs_det)``.

Parameters broadcast against z's batch dimensions, so the same function serves global parameters
(shape ``(D,)``) and amortized per-example ones (shape ``(B, D)`` against z ``(K, B, D)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowvae.numerics import at_least_float32, radial_parameters, safe_log, tanh_derivative


def planar(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Planar flow f(z) = z + û tanh(wᵀz + b), log|det| = log(1 + tanh'(a) wᵀû) (Rezende & Mohamed
    2015, eq. 10 and A.1).  Shapes: z (..., D), u and w (..., D), b (...) -> (..., D), (...)."""
    u_hat, one_plus_wu_hat = planar_constraint(u, w)
    return planar_chain(z, u_hat.unsqueeze(-2), w.unsqueeze(-2), b.unsqueeze(-1), one_plus_wu_hat.unsqueeze(-1))


def planar_constraint(u: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """û = u + (m(wᵀu) - wᵀu) w/‖w‖² with m(x) = -1 + softplus(x), so that wᵀû = m(wᵀu) >= -1 and
    the planar map is invertible; returns (û, 1 + wᵀû), the latter as softplus(wᵀu) >= 0 exactly
    (1 + wᵀu where w = 0).  Shapes: u and w (..., D) -> (..., D), (...)."""
    wu = (w * u).sum(-1)
    w_norm_sq = (w * w).sum(-1)
    safe_norm_sq = w_norm_sq.clamp_min(torch.finfo(w.dtype).tiny)
    softplus_wu = F.softplus(wu)
    u_hat = torch.addcmul(u, ((softplus_wu - 1.0 - wu) / safe_norm_sq).unsqueeze(-1), w)
    return u_hat, torch.where(w_norm_sq > 0, softplus_wu, 1.0 + wu)


def planar_chain(
    z: torch.Tensor, u_hat: torch.Tensor, w: torch.Tensor, b: torch.Tensor, one_plus_wu_hat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """T planar steps in a row, their constrained parameters prepared at once by
    :func:`planar_constraint`: z (..., D); u_hat and w (..., T, D), b and one_plus_wu_hat (..., T)
    (global parameters have no batch dimensions) -> z_T (..., D), Σ_t log|det| (...).

    Each step's determinant is c + h²(1 - c) with h = tanh(a), c = 1 + wᵀû >= 0, which is
    >= min(c, 1): it never cancels to 0 when wᵀû ≈ -1.

    With global parameters the loop runs on the T pre-activations alone: since
    z_t = z_0 + Σ_{s<t} h_s û_s, a_t = w_tᵀz_t + b_t = (w_tᵀz_0 + b_t) + Σ_{s<t} (w_tᵀû_s) h_s,
    so the step is two operations on T numbers per point, between two products (z_0 Wᵀ at the
    start, z_T = z_0 + H Û at the end).  With per-point parameters those products are batched
    and slower, eager and compiled, than updating z step by step, which is done there.
    """
    one_minus = 1.0 - one_plus_wu_hat
    if w.dim() > 2:
        step_dets = []
        per_step = zip(u_hat.unbind(-2), w.unbind(-2), b.unbind(-1), one_plus_wu_hat.unbind(-1), one_minus.unbind(-1))
        for u_t, w_t, b_t, c_t, one_minus_t in per_step:
            h_t = torch.tanh((z * w_t).sum(-1) + b_t)
            z = torch.addcmul(z, h_t.unsqueeze(-1), u_t)
            step_dets.append(torch.addcmul(c_t, h_t * h_t, one_minus_t))
        return z, safe_log(torch.stack(step_dets, -1)).sum(-1)
    steps = w.shape[-2]
    pre = z @ w.mT + b  # (..., T): w_tᵀz_0 + b_t (a sum, not addmm: under autocast it stays in z's dtype)
    coupling = w @ u_hat.mT  # (T, T): [t, s] = w_tᵀû_s
    hs = []
    for t in range(steps):
        h_t = torch.tanh(pre[..., t])
        hs.append(h_t)
        if t + 1 < steps:  # a_{t'} += (w_{t'}ᵀû_t) h_t; the columns up to t are not read again
            pre = torch.addcmul(pre, h_t.unsqueeze(-1), coupling[:, t])
    h = torch.stack(hs, -1)  # (..., T)
    z_out = z + h @ u_hat
    dets = torch.addcmul(one_plus_wu_hat, h * h, one_minus)
    return z_out, safe_log(dets).sum(-1)


def _radial_log_det(r: torch.Tensor, alpha: torch.Tensor, alpha_plus_beta: torch.Tensor, dim: int) -> torch.Tensor:
    # 1 + βh = (r + α + β)/(α + r);  1 + βh + βh'r = (r² + 2αr + α(α + β))/(α + r)²; all terms >= 0.
    log_alpha_r = safe_log(alpha + r)
    return (
        (dim - 1) * (safe_log(r + alpha_plus_beta) - log_alpha_r)
        + safe_log(r * r + 2.0 * alpha * r + alpha * alpha_plus_beta)
        - 2.0 * log_alpha_r
    )


def radial(
    z: torch.Tensor, z0: torch.Tensor, alpha_raw: torch.Tensor, beta_raw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """f(z) = z + β (z - z₀)/(α + r), r = ‖z - z₀‖, with α = softplus(α'), β = -α + softplus(β').

    Shapes: z (..., D), z0 (..., D), alpha_raw and beta_raw (...) -> (..., D), (...).
    log|det| = (D-1) log(1 + βh) + log(1 + βh + βh'r) with h = 1/(α + r).
    """
    alpha, beta = radial_parameters(alpha_raw, beta_raw)
    diff = z - z0
    r = torch.linalg.vector_norm(diff, dim=-1)
    z_new = z + (beta / (alpha + r)).unsqueeze(-1) * diff
    return z_new, _radial_log_det(r, alpha, F.softplus(beta_raw), z.shape[-1])


def radial_inverse(
    y: torch.Tensor, z0: torch.Tensor, alpha_raw: torch.Tensor, beta_raw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`radial`: the input radius r solves r² + (α + β - r')r - αr' = 0."""
    alpha, beta = radial_parameters(alpha_raw, beta_raw)
    alpha_plus_beta = F.softplus(beta_raw)
    diff = y - z0
    r_out = torch.linalg.vector_norm(diff, dim=-1)
    c = alpha_plus_beta - r_out
    root = torch.sqrt(c * c + 4.0 * alpha * r_out)
    # Two algebraically equal roots; pick the one without cancellation.
    tiny = torch.finfo(y.dtype).tiny
    r = torch.where(c > 0, 2.0 * alpha * r_out / (c + root).clamp_min(tiny), 0.5 * (root - c))
    z = z0 + diff * ((alpha + r) / (r + alpha_plus_beta).clamp_min(tiny)).unsqueeze(-1)
    return z, -_radial_log_det(r, alpha, alpha_plus_beta, y.shape[-1])


def householder(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reflection z - 2 v (vᵀz)/‖v‖²; volume preserving.  Shapes: z (..., D), v (..., D)."""
    v_norm_sq = (v * v).sum(-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    return z - 2.0 * v * (v * z).sum(-1, keepdim=True) / v_norm_sq


def householder_matrix(v: torch.Tensor) -> torch.Tensor:
    """Q = H(v₁)···H(v_k) as a dense matrix.  v (..., k, D) -> Q (..., D, D), orthogonal."""
    dim = v.shape[-1]
    q = torch.eye(dim, dtype=v.dtype, device=v.device).expand(*v.shape[:-2], dim, dim)
    for k in range(v.shape[-2]):
        vk = v[..., k, :]
        v_norm_sq = (vk * vk).sum(-1).clamp_min(torch.finfo(v.dtype).tiny)[..., None, None]
        q = q - 2.0 * (q @ vk.unsqueeze(-1)) @ vk.unsqueeze(-2) / v_norm_sq
    return q


def orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR decomposition a = QR: a (..., D, M), M <= D -> Q (..., D, M), QᵀQ = I.

    Computed in at least float32 with autocast off, then returned in a's dtype: CUDA's QR has no
    16-bit kernel, and a 16-bit orthogonalisation would miss QᵀQ = I, which the log-det assumes.
    """
    work = at_least_float32(a)
    with torch.autocast(device_type=a.device.type, enabled=False):
        q = torch.linalg.qr(work, mode="reduced").Q
    return q.to(a.dtype)


def _matvec(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """m @ x with broadcasting batch dims: m (..., P, Q), x (..., Q) -> (..., P).

    A global m (P, Q) against a batch x becomes one matmul x @ mᵀ; ``m @ x[..., None]`` would copy m
    once per batch element (and per importance sample when m is amortized).
    """
    if m.dim() == 2:
        return x @ m.transpose(0, 1)
    return torch.einsum("...pq,...q->...p", m, x)


def sylvester(
    z: torch.Tensor, q: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sylvester flow f(z) = z + Q R₁ tanh(R₂ Qᵀ z + b) (van den Berg et al. 2018, eq. 13).

    Shapes: z (..., D), q (..., D, M) with orthonormal columns, r1 and r2 (..., M, M) upper
    triangular with diag(r1)·diag(r2) > -1, b (..., M).
    log|det| = Σ_m log|1 + r1_mm r2_mm tanh'(a_m)|, computed as tanh²(a) + tanh'(a)(1 + r1_mm r2_mm).
    """
    a = _matvec(r2, _matvec(q.transpose(-1, -2), z)) + b
    z_new = z + _matvec(q, _matvec(r1, torch.tanh(a)))
    diag = torch.diagonal(r1, dim1=-2, dim2=-1) * torch.diagonal(r2, dim1=-2, dim2=-1)
    det = torch.tanh(a) ** 2 + tanh_derivative(a) * (1.0 + diag)
    return z_new, safe_log(det).sum(-1)
