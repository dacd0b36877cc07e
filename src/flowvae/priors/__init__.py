"""Priors p(z) over a model's latents: the fixed N(0, I), a flow prior and the VampPrior.

Every prior is an ``nn.Module`` with the same small contract (:class:`Prior`):

    log_p = prior.log_prob(z)        # z (*batch, *event) -> (*batch), exact, in at least float32
    z = prior.sample(n)              # (n, *event), without gradients
    prior.closed_form_kl             # False: KL(q ‖ p) can only be estimated by Monte Carlo

:class:`StandardNormalPrior` is the default and changes nothing.  :class:`FlowPrior` pushes N(0, I)
through a flow and scores z with *one* network pass in the density direction (MAF, coupling, Glow
steps; Papamakarios et al. 2017, Chen et al. 2017).  :class:`VampPrior` is the mixture of the
model's own Gaussian posteriors at K learned pseudo-inputs (Tomczak & Welling 2018).
:class:`DiagonalGaussianPrior` is a learned diagonal Gaussian over spatial latents (the ResNet
VAE's top prior).  :func:`build_prior` builds one by name from the :data:`PRIORS` registry.

Layout: ``base`` (the contract, N(0, I)), ``gaussian``, ``flow`` (flow priors and their families,
:data:`FLOW_PRIORS`), ``vamp``, ``build`` (the registry of names).

References:
    Papamakarios, Pavlakou & Murray (2017). Masked Autoregressive Flow for Density Estimation.
    Chen, Kingma, Salimans, Duan, Dhariwal, Schulman, Sutskever & Abbeel (2017). Variational
    Lossy Autoencoder (an autoregressive flow prior, scored in one pass).
    Kingma & Dhariwal (2018). Glow: Generative Flow with Invertible 1x1 Convolutions.
    Tomczak & Welling (2018). VAE with a VampPrior. AISTATS.
"""

from flowvae.priors.base import Prior, StandardNormalPrior, as_event_shape, split_equally
from flowvae.priors.build import PRIOR_NAMES, PRIORS, build_prior
from flowvae.priors.flow import (
    FLOW_PRIOR_NAMES,
    FLOW_PRIORS,
    FlowPrior,
    FlowPriorFamily,
    build_flow_prior,
    has_one_pass_density,
)
from flowvae.priors.gaussian import DiagonalGaussianPrior
from flowvae.priors.vamp import Encode, VampPrior, gaussian_mixture_log_prob

__all__ = [
    "Prior",
    "StandardNormalPrior",
    "DiagonalGaussianPrior",
    "FlowPrior",
    "VampPrior",
    "build_prior",
    "build_flow_prior",
    "has_one_pass_density",
    "gaussian_mixture_log_prob",
    "PRIORS",
    "PRIOR_NAMES",
    "FLOW_PRIORS",
    "FLOW_PRIOR_NAMES",
    "FlowPriorFamily",
    "Encode",
    "as_event_shape",
    "split_equally",
]
