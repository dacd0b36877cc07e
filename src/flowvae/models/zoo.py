"""The model registry: architecture name -> builder ``(ModelConfig, image_shape, data_kind) -> model``.

``flowvae train --arch NAME`` builds ``MODELS[NAME](config.model, image_shape, data_kind)``; a new
architecture is added here, in one place: a builder decorated with :func:`register_model`, which
also records the posterior flows it takes (vector flows by default, ``IMAGE_FLOW_NAMES`` for
spatial latents).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flowvae.flows import FLOW_NAMES, IMAGE_FLOW_NAMES
from flowvae.models.base import LatentVariableModel
from flowvae.models.config import ModelConfig
from flowvae.models.ladder import LadderVAE
from flowvae.models.likelihoods import Likelihood, build_likelihood, default_likelihood
from flowvae.models.resnet import build_resnet_vae
from flowvae.models.vae import build_vae
from flowvae.priors import build_prior
from flowvae.registry import Registry

ModelBuilder = Callable[[ModelConfig, Sequence[int], str], LatentVariableModel]
MODELS: Registry[ModelBuilder] = Registry("architecture")
ARCHITECTURE_FLOWS: dict[str, tuple[str, ...]] = {}
"""The posterior flows each architecture takes; an architecture registered on :data:`MODELS` directly
takes the vector flows (``FLOW_NAMES``)."""


def register_model(name: str, flows: tuple[str, ...] = FLOW_NAMES) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register a model builder under ``name`` in :data:`MODELS`, taking the posterior ``flows``."""

    def add(builder: ModelBuilder) -> ModelBuilder:
        MODELS.register(name)(builder)
        ARCHITECTURE_FLOWS[name.lower()] = flows
        return builder

    return add


def model_likelihood(config: ModelConfig, data_kind: str) -> Likelihood:
    return build_likelihood(config.likelihood or default_likelihood(data_kind), data_kind)


def with_prior(
    model: LatentVariableModel, config: ModelConfig, event_shape: Sequence[int], encode: Callable | None = None
) -> LatentVariableModel:
    """Give ``model`` the (top layer's) prior that ``config`` names; 'standard' keeps N(0, I).

    ``encode`` maps pseudo-inputs to the Gaussian (mean, log_std) of q(z|u) for the VampPrior; it
    is a bound method of the model, so copies of the model (EMA) score with their own encoder."""
    if config.prior != "standard":
        model.prior = build_prior(
            config.prior,
            tuple(event_shape),
            flow=config.prior_flow,
            steps=config.prior_flow_steps,
            hidden=config.flow_hidden,
            n_pseudo=config.pseudo_inputs,
            image_shape=model.image_shape,
            encode=encode,
        )
    return model


def _single_latent(arch: str) -> ModelBuilder:
    def build(config: ModelConfig, image_shape: Sequence[int], data_kind: str) -> LatentVariableModel:
        model = build_vae(
            arch,
            image_shape,
            config.latent_dim,
            model_likelihood(config, data_kind),
            hidden=config.hidden,
            feature_dim=config.feature_dim,
            flow=config.flow,
            flow_steps=config.flow_steps,
            flow_hidden=config.flow_hidden,
            reflections=config.reflections,
            rank=config.rank,
            data_kind=data_kind,
            flow_context=config.flow_context,
            activation=config.activation,
            dropout=config.dropout,
            log_var_bounds=config.log_var_bounds,
        )
        return with_prior(model, config, (config.latent_dim,), model.gaussian_parameters)

    return build


for _arch in ("mlp", "conv", "gated"):
    register_model(_arch)(_single_latent(_arch))


@register_model("ladder")
def _ladder(config: ModelConfig, image_shape: Sequence[int], data_kind: str) -> LatentVariableModel:
    model = LadderVAE(
        image_shape,
        model_likelihood(config, data_kind),
        latent_dim=config.latent_dim,
        layers=config.layers,
        hidden=config.hidden,
        flow=config.flow,
        flow_steps=config.flow_steps,
        flow_hidden=config.flow_hidden,
        reflections=config.reflections,
        rank=config.rank,
        flow_context=config.flow_context,
        activation=config.activation,
        dropout=config.dropout,
        log_var_bounds=config.log_var_bounds,
        autoregressive_decoder=config.autoregressive_decoder,
        pixelcnn_layers=config.pixelcnn_layers,
        pixelcnn_channels=config.pixelcnn_channels,
        pixelcnn_conditioned=config.pixelcnn_conditioned,
    )
    return with_prior(model, config, (config.latent_dim,), model.top_gaussian_parameters)


@register_model("resnet", flows=IMAGE_FLOW_NAMES)
def _resnet(config: ModelConfig, image_shape: Sequence[int], data_kind: str) -> LatentVariableModel:
    model = build_resnet_vae(
        image_shape,
        model_likelihood(config, data_kind),
        layers=config.layers,
        channels=config.channels,
        latent_channels=config.latent_dim,
        flow=config.flow,
        flow_steps=config.flow_steps,
        flow_hidden=config.flow_hidden,
    )
    return with_prior(model, config, model.latent_shape)


ARCHITECTURES = MODELS.names()


def build_model(config: ModelConfig, image_shape: Sequence[int], data_kind: str) -> LatentVariableModel:
    """The model that ``config`` describes, for images of ``image_shape`` (C, H, W) of ``data_kind``.

    >>> from flowvae.models import ModelConfig
    >>> config = ModelConfig(arch="ladder", layers=2, latent_dim=4, hidden=32, flow="iaf")
    >>> model = build_model(config, (1, 8, 8), "binary")
    >>> type(model).__name__, sorted(model.noise_shapes())
    ('LadderVAE', ['z1', 'z2'])
    """
    return MODELS[config.arch](config, tuple(image_shape), data_kind)
