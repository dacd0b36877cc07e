"""The boundary between models and everything else.

The trainer, evaluation, the importance-weighted estimator, DDP sharding, sampling and the
diagnostics ask a model only what :class:`LatentVariableModel` declares.  None of them knows how
many latent layers a model has or what its noise looks like:

    noise = draw_noise(model, samples=K, batch=B)        # {name: (K, B, *shape)} standard normal
    encoded = model.encode(x)                            # sample-independent inference, once per batch
    ld = model.log_densities(x, encoded, K, noise)       # LogDensities, every field (K, B)
    images = model.sample(n)                             # from the prior

A user's own model that implements these methods trains with ``flowvae.training``'s machinery.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import nn

from flowvae.models.likelihoods import Likelihood
from flowvae.priors.base import Prior

Noise = dict[str, torch.Tensor]
Encoded = TypeVar("Encoded")
"""What a model's :meth:`~LatentVariableModel.encode` returns and its ``log_densities`` reads back."""


@dataclass
class BottomUp:
    """What the bottom-up pass of a hierarchical model leaves for its top-down pass: per stochastic
    layer (bottom first), the tensors that layer reads, each (B, …) (e.g. its features d_l, or its
    posterior's mean, log σ and context)."""

    layers: list[tuple[torch.Tensor, ...]]

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]


@dataclass
class LogDensities:
    """Per-sample log-densities of a latent-variable model, each (K, B).

    ``log_prior`` is log p(z) (for a hierarchy, Σ_l log p(z_l | z_>l)); ``log_posterior`` is
    log q(z|x) likewise.  ``kl_groups`` (K, B, G) splits log q − log p into the model's free-bits
    groups (per layer, or per layer and channel for spatial latents) and sums to ``kl``;
    ``group_units[g]`` is how many free-bits units group g holds (its floor is λ · units).
    ``latents`` holds the sampled latent variables, name -> (K, B, *shape).
    """

    log_likelihood: torch.Tensor
    log_prior: torch.Tensor
    log_posterior: torch.Tensor
    latents: dict[str, torch.Tensor]
    kl_groups: torch.Tensor | None = None
    group_units: tuple[int, ...] | None = None
    group_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kl_groups is None:
            self.kl_groups = self.kl.unsqueeze(-1)
            self.group_units = (sum(math.prod(z.shape[2:]) for z in self.latents.values()),)
            self.group_names = ("z",)
        if self.group_units is None or len(self.group_units) != self.kl_groups.shape[-1]:
            raise ValueError(
                f"group_units {self.group_units} must give one count per KL group ({self.kl_groups.shape[-1]})"
            )
        if self.group_names is None:
            self.group_names = tuple(f"group{g}" for g in range(len(self.group_units)))

    @property
    def kl(self) -> torch.Tensor:
        """Single-sample estimate of KL(q(z|x) ‖ p(z)): log q − log p, (K, B)."""
        return self.log_posterior - self.log_prior

    @property
    def log_weight(self) -> torch.Tensor:
        """log p(x, z) − log q(z|x), (K, B)."""
        return self.log_likelihood + self.log_prior - self.log_posterior

    @property
    def z(self) -> torch.Tensor:
        """The latent sample of a single-latent model, (K, B, D)."""
        if len(self.latents) != 1:
            raise AttributeError(
                f"this model has {len(self.latents)} latent groups ({', '.join(self.latents)}); read .latents"
            )
        return next(iter(self.latents.values()))


class LatentVariableModel(nn.Module, Generic[Encoded]):
    """What flowvae's trainer, evaluation and command line may ask of a model.

    Subclasses set ``image_shape`` (C, H, W) and ``likelihood``, and implement
    :meth:`noise_shapes`, :meth:`encode`, :meth:`log_densities`, :meth:`sample` and
    :meth:`reconstruct`; ``Encoded`` is the type ``encode`` returns (``LatentVariableModel[BottomUp]``).
    :meth:`initialise` and :meth:`init_output_bias` are optional hooks with defaults.  The noise is
    all the randomness of one draw from q(z|x): given the same noise, ``log_densities`` is
    deterministic, which is what makes DDP shards, bit-identical resume and reproducible evaluation
    work for every model.
    """

    image_shape: tuple[int, int, int]
    likelihood: Likelihood

    def noise_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per data point, the shape of each standard-normal noise tensor of one posterior draw."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Encoded:
        """The part of inference that does not depend on the sample (e.g. the bottom-up pass).

        Computed once per batch and reused for every chunk of importance samples."""
        raise NotImplementedError

    def log_densities(
        self, x: torch.Tensor, encoded: Encoded, samples: int = 1, noise: Noise | torch.Tensor | None = None
    ) -> LogDensities:
        """Draw ``samples`` z ~ q(z|x) (from ``noise`` (samples, B, ...) if given) and score them."""
        raise NotImplementedError

    def path_log_densities(
        self, x: torch.Tensor, encoded: Encoded, samples: int = 1, noise: Noise | torch.Tensor | None = None
    ) -> LogDensities:
        """As :meth:`log_densities`, but log q(z|x) is scored with the posterior's parameters held
        constant, so its gradient flows along the path of the samples only (STL, DReG); every use
        of a sample must derive from the tensors in ``latents``.  Exact where
        :meth:`path_gradient_problem` returns None."""
        raise NotImplementedError(self.path_gradient_problem() or f"{type(self).__name__}.path_log_densities")

    def path_gradient_problem(self) -> str | None:
        """None where :meth:`path_log_densities` is implemented and exact; otherwise the posterior
        it is not implemented for, e.g. "the iaf flow posterior"."""
        return f"the posterior of {type(self).__name__}"

    def initialise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Data-dependent initialisation on a batch x (B, C, H, W), called once at the start of a fresh
        run (never on resume).  The default does nothing; the ResNet VAE initialises its
        weight-normalised layers (:func:`flowvae.models.weight_norm.initialise`)."""

    def init_output_bias(self, mean_image: torch.Tensor) -> None:
        """Set the decoder's output bias so that the likelihood's mean is ``mean_image`` (C, H, W)
        at zero hidden activity: logit(mean training pixel) for a Bernoulli likelihood."""
        raise ValueError(f"{type(self).__name__} cannot initialise its decoder's output bias from the data")

    def forward(
        self,
        x: torch.Tensor,
        samples: int = 1,
        noise: Noise | torch.Tensor | None = None,
        path_gradient: bool = False,
        encoder_input: torch.Tensor | None = None,
    ) -> LogDensities:
        """log-densities of ``samples`` posterior draws for x; ``encoder_input`` (default x) is what
        the encoder sees (e.g. x with noise), ``path_gradient`` uses :meth:`path_log_densities`."""
        encoded = self.encode(x if encoder_input is None else encoder_input)
        score = self.path_log_densities if path_gradient else self.log_densities
        return score(x, encoded, samples, noise)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, H, W) with values in [0, 1]: the likelihood's mean at z ~ p(z)."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean at one posterior sample, (B, C, H, W)."""
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        """One-line error unless x is a batch of images of this model's shape."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.image_shape):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects images of shape (B, "
                f"{', '.join(map(str, self.image_shape))}), got {shape}"
            )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters (noise is drawn in it, never in 16 bits)."""
        return next(self.parameters()).dtype


def draw_noise(
    model: LatentVariableModel,
    samples: int,
    batch: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Noise:
    """Standard-normal noise for ``samples`` posterior draws of ``batch`` data points: {name: (K, B, *shape)}.

    Drawn in ``model.noise_shapes()`` order from ``generator``, so the same generator state gives the same noise."""
    ref = next(model.parameters())
    device = ref.device if device is None else device
    dtype = ref.dtype if dtype is None else dtype
    return {
        name: torch.randn(samples, batch, *shape, generator=generator, device=device, dtype=dtype)
        for name, shape in model.noise_shapes().items()
    }


def sample_prior(
    prior: Prior | None,
    n: int,
    event_shape: tuple[int, ...],
    like: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n draws (n, *event_shape) from ``prior`` (None: N(0, I)) in ``like``'s dtype and device."""
    if prior is None:
        return torch.randn(n, *event_shape, generator=generator, device=like.device, dtype=like.dtype)
    return prior.sample(n, generator).to(like.dtype)


def select_noise(noise: Mapping[str, torch.Tensor], index: torch.Tensor | slice) -> Noise:
    """The data points ``index`` (along axis 1, the batch) of every noise tensor."""
    return {name: t[:, index] for name, t in noise.items()}


def as_noise(model: LatentVariableModel, noise: Noise | torch.Tensor | None) -> Noise | None:
    """Accept a bare tensor for a model with a single noise tensor."""
    if noise is None or isinstance(noise, Mapping):
        return noise
    names = list(model.noise_shapes())
    if len(names) != 1:
        raise ValueError(f"{type(model).__name__} needs noise as a dict with keys {names}")
    return {names[0]: noise}
