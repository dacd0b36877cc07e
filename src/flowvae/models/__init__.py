"""VAEs with flow posteriors: architectures, likelihoods and the model."""

from flowvae.models.likelihoods import LIKELIHOODS, Likelihood, build_likelihood, default_likelihood
from flowvae.models.vae import ARCHITECTURES, VAE, GaussianEncoder, LogDensities, build_vae, count_parameters

__all__ = ["VAE", "GaussianEncoder", "LogDensities", "build_vae", "count_parameters", "ARCHITECTURES",
           "Likelihood", "LIKELIHOODS", "build_likelihood", "default_likelihood"]
