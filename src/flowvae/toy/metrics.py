"""How well does q = flow_*N(0, I) fit p ∝ exp(−U)?  ELBO, importance-sampled log Z, ESS, quadrature.

With log weights log w(z) = −U(z) − log q(z), z ~ q:

- ELBO = E_q[log w] <= log Z, and KL(q ‖ p) = log Z − ELBO;
- IS log Z = log (1/n) Σ w_i, unbiased for Z (not for log Z: its bias is −Var/(2 n Z²) to first order);
- ESS = (Σ w)² / Σ w² (Kish), reported as a count and as a fraction of n; 1.0 means q = p.

Quadrature sums exp(−U) at the centres of a fine grid over the target's quadrature box (the
midpoint rule, error O(h²) for smooth U), which is log Z when the box holds the mass (``Target.proper``).
Everything is computed in float64 on a float64 copy of the flow.
"""

from __future__ import annotations

import copy
import logging
import math

import torch

from flowvae.flows.base import Flow
from flowvae.grids import grid_points
from flowvae.toy.energies import Box, Target
from flowvae.toy.fit import sample

logger = logging.getLogger(__name__)


def quadrature_log_z(target: Target, size: int = 1000, box: Box | None = None) -> float:
    """log ∫_box exp(−U) by the midpoint rule on ``size``² cells (float64).

    ``box`` defaults to the target's ``quadrature_box``, else its plotting ``box``.
    """
    grid, area = grid_points(box or target.quadrature_box or target.box, size)
    log_u = -target.energy(grid).reshape(-1)
    return (torch.logsumexp(log_u, 0) + math.log(area)).item()


def importance_weights(
    target: Target, flow: Flow | None, samples: int = 100_000, seed: int = 0, chunk: int = 50_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples z ~ q (float64, (n, 2)) and their log weights −U(z) − log q(z) (n,)."""
    if flow is not None:
        flow = copy.deepcopy(flow).to(dtype=torch.float64, device="cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    zs, log_ws = [], []
    with torch.no_grad():
        for start in range(0, samples, chunk):
            n = min(chunk, samples - start)
            z, log_q = sample(flow, n, generator, dtype=torch.float64, device="cpu")
            zs.append(z)
            log_ws.append(-target.energy(z) - log_q)
    return torch.cat(zs), torch.cat(log_ws)


def summarize_log_weights(log_w: torch.Tensor) -> dict[str, float]:
    """ELBO (with its standard error), IS log Z and Kish ESS from log weights (n,)."""
    n = log_w.numel()
    finite = torch.isfinite(log_w)
    if not bool(finite.all()):
        logger.warning("%d of %d log weights are not finite", int((~finite).sum()), n)
    log_w = log_w.to(torch.float64)
    lse = torch.logsumexp(log_w, 0)
    ess = torch.exp(2.0 * lse - torch.logsumexp(2.0 * log_w, 0)).item()
    return {
        "elbo": log_w.mean().item(),
        "elbo_stderr": (log_w.std() / math.sqrt(n)).item() if n > 1 else math.nan,
        "is_log_z": (lse - math.log(n)).item(),
        "ess": ess,
        "ess_fraction": ess / n,
        "samples": n,
    }


def evaluate(
    target: Target, flow: Flow | None, samples: int = 100_000, seed: int = 0, quadrature_size: int = 1000
) -> dict[str, float | int | str | None]:
    """Metrics of q = flow_*N(0, I) (``flow=None``: q = N(0, I)) against ``target``.

    Returns a JSON-ready dict:
        elbo, elbo_stderr: E_q[−U − log q] and its Monte Carlo standard error.
        is_log_z, ess, ess_fraction, samples: importance sampling with q as the proposal.
        log_z_exact: closed-form log Z, or None.
        log_z_quadrature: log ∫ exp(−U) over the quadrature box; equals log Z only when ``proper``.
        log_z, log_z_source: the reference log Z used below ('exact', 'quadrature', or None for
            targets without a finite normaliser, such as the unconfined U2–U4).
        kl: log Z − ELBO = KL(q ‖ p) (None without a reference).
        is_log_z_error: IS log Z − log Z (None without a reference).
        q_mass_in_box: fraction of the samples of q inside the target's plotting box.
        proper: copied from the target.
    """
    z, log_w = importance_weights(target, flow, samples, seed)
    out: dict[str, float | int | str | None] = dict(summarize_log_weights(log_w))
    quad = quadrature_log_z(target, quadrature_size)
    if target.log_z is not None:
        log_z, source = target.log_z, "exact"
    elif target.proper:
        log_z, source = quad, "quadrature"
    else:
        log_z, source = None, None
    x0, x1, y0, y1 = target.box
    inside = (z[:, 0] >= x0) & (z[:, 0] <= x1) & (z[:, 1] >= y0) & (z[:, 1] <= y1)
    out.update(
        {
            "log_z_exact": target.log_z,
            "log_z_quadrature": quad,
            "log_z": log_z,
            "log_z_source": source,
            "kl": None if log_z is None else log_z - out["elbo"],
            "is_log_z_error": None if log_z is None else out["is_log_z"] - log_z,
            "q_mass_in_box": inside.double().mean().item(),
            "proper": target.proper,
        }
    )
    return out
