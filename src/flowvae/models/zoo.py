"""The model registry: architecture name -> builder ``(ModelConfig, image_shape, data_kind) -> model``.

``flowvae train --arch NAME`` builds ``MODELS[NAME](config.model, image_shape, data_kind)``; a new
architecture is added here, in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flowvae.models.base import LatentVariableModel
from flowvae.models.config import ModelConfig
from flowvae.flows import FLOW_NAMES
from flowvae.models.ladder import LadderVAE
from flowvae.models.resnet import build_resnet_vae
from flowvae.models.likelihoods import Likelihood, build_likelihood, default_likelihood
from flowvae.models.vae import build_vae
from flowvae.priors import build_prior
from flowvae.registry import Registry

MODELS: Registry = Registry("architecture")


def model_likelihood(config: ModelConfig, data_kind: str) -> Likelihood:
    return build_likelihood(config.likelihood or default_likelihood(data_kind), data_kind)


def with_prior(model: LatentVariableModel, config: ModelConfig, event_shape: Sequence[int],
               encode: Callable | None = None) -> LatentVariableModel:
    """Give ``model`` the (top layer's) prior that ``config`` names; 'standard' keeps N(0, I).

    ``encode`` maps pseudo-inputs to the Gaussian (mean, log_std) of q(z|u) for the VampPrior; it
    is a bound method of the model, so copies of the model (EMA) score with their own encoder."""
    if config.prior != "standard":
        model.prior = build_prior(config.prior, tuple(event_shape), flow=config.prior_flow,
                                  steps=config.prior_flow_steps, hidden=config.flow_hidden,
                                  n_pseudo=config.pseudo_inputs, image_shape=model.image_shape, encode=encode)
    return model


def _single_latent(arch: str):
    def build(config: ModelConfig, image_shape: Sequence[int], data_kind: str) -> LatentVariableModel:
        model = build_vae(arch, image_shape, config.latent_dim, model_likelihood(config, data_kind), config.hidden,
                          config.feature_dim, config.flow, config.flow_steps, config.flow_hidden, config.reflections,
                          config.rank, data_kind=data_kind, flow_context=config.flow_context,
                          activation=config.activation, dropout=config.dropout, log_var_bounds=config.log_var_bounds)
        return with_prior(model, config, (config.latent_dim,), model.gaussian_parameters)
    return build


for _arch in ("mlp", "conv", "gated"):
    MODELS.register(_arch)(_single_latent(_arch))


@MODELS.register("ladder")
def _ladder(config: ModelConfig, image_shape: Sequence[int], data_kind: str) -> LatentVariableModel:
    model = LadderVAE(image_shape, model_likelihood(config, data_kind), config.latent_dim, config.layers,
                      config.hidden, config.flow, config.flow_steps, config.flow_hidden, config.reflections,
                      config.rank, config.flow_context, activation=config.activation, dropout=config.dropout,
                      log_var_bounds=config.log_var_bounds)
    return with_prior(model, config, (config.latent_dim,), model.top_gaussian_parameters)


@MODELS.register("resnet")
def _resnet(config: ModelConfig, image_shape: Sequence[int], data_kind: str) -> LatentVariableModel:
    model = build_resnet_vae(image_shape, model_likelihood(config, data_kind), config.layers, config.channels,
                             config.latent_dim, config.flow, config.flow_steps, config.flow_hidden)
    return with_prior(model, config, model.latent_shape)


ARCHITECTURES = MODELS.names()
# The posterior flows each architecture takes (vector flows for the MLP/conv models, image flows for resnet).
ARCHITECTURE_FLOWS = {name: FLOW_NAMES for name in ARCHITECTURES} | {"resnet": ("none", "iaf", "glow", "coupling")}


def build_model(config: ModelConfig, image_shape: Sequence[int], data_kind: str) -> LatentVariableModel:
    """The model that ``config`` describes, for images of ``image_shape`` (C, H, W) of ``data_kind``.

    >>> from flowvae.models import ModelConfig
    >>> model = build_model(ModelConfig(arch="ladder", layers=2, latent_dim=4, hidden=32, flow="iaf"), (1, 8, 8), "binary")
    >>> type(model).__name__, sorted(model.noise_shapes())
    ('LadderVAE', ['z1', 'z2'])
    """
    return MODELS[config.arch](config, tuple(image_shape), data_kind)
