"""2-D variational inference with flows: fit q = flow_*N(0, I) to p ∝ exp(−U) by reverse KL.

The energies U1–U4 of Rezende & Mohamed (2015) and targets with a known normaliser live in
:mod:`~flowvae.toy.energies`; :func:`fit` trains a flow, :func:`evaluate` reports the ELBO, the
importance-sampled log Z with its effective sample size, and log Z by quadrature; the plots draw
Fig. 3 of the paper.  The command line is :mod:`flowvae.toy.cli` (``flowvae toy``).
"""

from flowvae.toy.energies import (
    TARGETS,
    Target,
    banana_target,
    gaussian_target,
    get_target,
    mixture_target,
    ring_target,
    u1,
    u2,
    u3,
    u4,
    w1,
    w2,
    w3,
)
from flowvae.toy.fit import FitResult, beta_schedule, default_anneal_steps, fit, sample
from flowvae.toy.metrics import evaluate, importance_weights, quadrature_log_z, summarize_log_weights
from flowvae.toy.plots import flow_samples, plot_fit, plot_grid, sample_image, target_image

__all__ = [
    "TARGETS",
    "Target",
    "get_target",
    "u1",
    "u2",
    "u3",
    "u4",
    "w1",
    "w2",
    "w3",
    "gaussian_target",
    "mixture_target",
    "banana_target",
    "ring_target",
    "fit",
    "FitResult",
    "beta_schedule",
    "default_anneal_steps",
    "sample",
    "evaluate",
    "importance_weights",
    "quadrature_log_z",
    "summarize_log_weights",
    "plot_fit",
    "plot_grid",
    "flow_samples",
    "sample_image",
    "target_image",
]
