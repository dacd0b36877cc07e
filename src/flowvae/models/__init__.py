"""Latent-variable models behind one protocol (:mod:`flowvae.models.base`): the single-latent VAE
with a flow posterior, the MLP ladder VAE, the ResNet VAE; likelihoods and the model registry."""

from flowvae.models.base import BottomUp, LatentVariableModel, LogDensities, draw_noise, select_noise
from flowvae.models.config import MODEL_FIELDS, ModelConfig
from flowvae.models.ladder import LadderVAE
from flowvae.models.likelihoods import (
    LIKELIHOODS,
    Likelihood,
    build_likelihood,
    default_likelihood,
    register_likelihood,
)
from flowvae.models.resnet import ResNetVAE, build_resnet_vae
from flowvae.models.vae import VAE, GaussianEncoder, as_unit_interval, build_vae, count_parameters
from flowvae.models.zoo import ARCHITECTURE_FLOWS, ARCHITECTURES, MODELS, build_model, register_model

__all__ = [
    "LatentVariableModel",
    "LogDensities",
    "BottomUp",
    "draw_noise",
    "select_noise",
    "ModelConfig",
    "MODEL_FIELDS",
    "VAE",
    "GaussianEncoder",
    "LadderVAE",
    "ResNetVAE",
    "build_resnet_vae",
    "ARCHITECTURE_FLOWS",
    "build_vae",
    "build_model",
    "MODELS",
    "register_model",
    "count_parameters",
    "ARCHITECTURES",
    "as_unit_interval",
    "Likelihood",
    "LIKELIHOODS",
    "build_likelihood",
    "default_likelihood",
    "register_likelihood",
]
