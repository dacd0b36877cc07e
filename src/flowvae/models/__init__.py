"""VAEs with flow posteriors: architectures, likelihoods and the model."""

from flowvae.models.likelihoods import LIKELIHOODS, Likelihood, build_likelihood, default_likelihood
from flowvae.models.vae import (ARCHITECTURES, VAE, GaussianEncoder, LogDensities, as_unit_interval, build_vae,
                                count_parameters)

__all__ = ["VAE", "GaussianEncoder", "LogDensities", "build_vae", "count_parameters", "ARCHITECTURES", "as_unit_interval",
           "Likelihood", "LIKELIHOODS", "build_likelihood", "default_likelihood"]
