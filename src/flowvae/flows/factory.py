"""Build a stack of posterior flows by name, as the CLI and the model configs do: vector flows
(:data:`FLOWS`, :func:`build_flow`) and image flows on spatial latents (:data:`IMAGE_FLOWS`,
:func:`build_image_flow`).

Each family registers one builder ``(dim, steps, context_dim, options) -> Flow`` in :data:`FLOWS`
that returns the whole stack of ``steps`` steps; ``options`` holds the family options
(``hidden``, ``reflections``, ``rank``).  :func:`per_step` makes such a builder from one that
builds step ``k`` alone (orderings and coupling halves alternate with k); planar, IAF and MAF keep
their steps in one module with stacked parameters (``steps=T``).

Each image family registers ``(channels, k, hidden, context_channels) -> list[Flow]`` in
:data:`IMAGE_FLOWS`: the flows of step k, conditioned on a spatial context (the ResNet VAE's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowvae.flows.autoregressive import IAF, MAF
from flowvae.flows.base import Compose, Flow
from flowvae.flows.elementwise import Householder, Planar, Radial
from flowvae.flows.glow import ActNorm, AffineCoupling, InvertibleConv1x1, SpatialContextCoupling
from flowvae.flows.masked_conv import ConvIAF
from flowvae.flows.sylvester import HouseholderSylvester, OrthogonalSylvester, TriangularSylvester
from flowvae.registry import Registry

FLOWS: Registry = Registry("flow")
IMAGE_FLOWS: Registry = Registry("image flow")
MAX_FLOW_STEPS = 256

StackBuilder = Callable[[int, int, "int | None", dict], Flow]


def per_step(step: Callable[[int, int, int | None, dict], Flow]) -> StackBuilder:
    """A stack builder from ``step(dim, k, context_dim, options)``: a ``Compose`` of steps k = 0..T-1."""
    return lambda dim, steps, context_dim, o: Compose([step(dim, k, context_dim, o) for k in range(steps)])


FLOWS.register("planar")(lambda dim, steps, context_dim, o: Planar(dim, context_dim, steps))
FLOWS.register("radial")(per_step(lambda dim, k, context_dim, o: Radial(dim, context_dim)))
FLOWS.register("householder")(per_step(lambda dim, k, context_dim, o: Householder(dim, 1, context_dim)))
FLOWS.register("sylvester-orthogonal")(
    per_step(lambda dim, k, context_dim, o: OrthogonalSylvester(dim, o["rank"], context_dim))
)
FLOWS.register("sylvester-householder")(
    per_step(lambda dim, k, context_dim, o: HouseholderSylvester(dim, o["reflections"], context_dim))
)
FLOWS.register("sylvester-triangular")(
    per_step(lambda dim, k, context_dim, o: TriangularSylvester(dim, k % 2 == 1, context_dim))
)
FLOWS.register("iaf")(lambda dim, steps, context_dim, o: IAF(dim, (o["hidden"], o["hidden"]), context_dim, steps=steps))
FLOWS.register("maf")(lambda dim, steps, context_dim, o: MAF(dim, (o["hidden"], o["hidden"]), context_dim, steps=steps))
FLOWS.register("coupling")(
    per_step(lambda dim, k, context_dim, o: AffineCoupling(dim, o["hidden"], context_dim, event_dim=1, swap=k % 2 == 1))
)

FLOW_NAMES = ("none", *FLOWS.names())


def build_flow(
    name: str,
    dim: int,
    steps: int,
    context_dim: int | None = None,
    hidden: int = 320,
    reflections: int = 8,
    rank: int | None = None,
    **options: Any,
) -> Flow | None:
    """A stack of ``steps`` flows of one family over ``dim`` latents, or None for 'none'.

    Planar, radial, Householder and Sylvester steps are amortized (their parameters come from h);
    IAF, MAF and coupling steps have global weights and read h as an extra input.  Autoregressive
    orderings and coupling halves alternate between steps.

    Args:
        name: a family of :data:`FLOW_NAMES` (``'planar'``, ``'iaf'``, ...) or ``'none'``.
        dim: latent size D.
        steps: flow steps T, 1 to ``MAX_FLOW_STEPS``.
        context_dim: size of the context h the flow is conditioned on (None: global parameters).
        hidden: width of the MADE / coupling networks.
        reflections: Householder reflections (Householder-Sylvester).
        rank: orthogonal Sylvester's rank M (default D).
        **options: further options of the family's builder.

    Returns:
        A :class:`~flowvae.flows.Flow`, ``flow(z, context) -> (z_K, log|det|)``, or None.

    Examples:
        >>> import torch
        >>> flow = build_flow("iaf", dim=4, steps=2, context_dim=8, hidden=16)
        >>> z, log_abs_det = flow(torch.randn(10, 4), context=torch.randn(10, 8))
        >>> tuple(z.shape), tuple(log_abs_det.shape)
        ((10, 4), (10,))
    """
    if name == "none":
        return None
    builder = FLOWS[name]
    if not 1 <= steps <= MAX_FLOW_STEPS:
        raise ValueError(f"flow {name!r} needs between 1 and {MAX_FLOW_STEPS} steps, got {steps}")
    if rank is not None and not 1 <= rank <= dim:
        raise ValueError(f"Sylvester rank must be between 1 and the latent size {dim}, got {rank}")
    options = {"hidden": hidden, "reflections": reflections, "rank": rank, **options}
    return builder(dim, steps, context_dim, options)


ImageStep = Callable[[int, int, int, int], list[Flow]]


def _two_channels(kind: str, channels: int) -> None:
    if channels < 2:
        raise ValueError(f"flow {kind!r} needs latent_channels >= 2, got {channels}")


@IMAGE_FLOWS.register("iaf")
def _conv_iaf(channels: int, k: int, hidden: int, context_channels: int) -> list[Flow]:
    """One ConvIAF step; the channel order is reversed between steps."""
    return [ConvIAF(channels, hidden, context_channels, order="natural" if k % 2 == 0 else "reversed")]


@IMAGE_FLOWS.register("glow")
def _glow(channels: int, k: int, hidden: int, context_channels: int) -> list[Flow]:
    """ActNorm, invertible 1x1 convolution and coupling; the halves swap between steps."""
    _two_channels("glow", channels)
    return [
        ActNorm(channels),
        InvertibleConv1x1(channels),
        SpatialContextCoupling(channels, hidden, context_channels, swap=k % 2 == 1),
    ]


@IMAGE_FLOWS.register("coupling")
def _spatial_coupling(channels: int, k: int, hidden: int, context_channels: int) -> list[Flow]:
    """One coupling; the halves swap between steps."""
    _two_channels("coupling", channels)
    return [SpatialContextCoupling(channels, hidden, context_channels, swap=k % 2 == 1)]


IMAGE_FLOW_NAMES = ("none", *IMAGE_FLOWS.names())


def build_image_flow(name: str, channels: int, steps: int, hidden: int, context_channels: int) -> list[Flow]:
    """The posterior flow of one spatial latent layer as a list of steps, each conditioned on a spatial
    context of ``context_channels``: ``steps`` × the flows of family ``name`` (a name of
    :data:`IMAGE_FLOW_NAMES`); 'none' (or steps = 0): no flow.

    >>> steps = build_image_flow("glow", channels=4, steps=1, hidden=8, context_channels=3)
    >>> print(", ".join(type(f).__name__ for f in steps))
    ActNorm, InvertibleConv1x1, SpatialContextCoupling
    """
    if name not in IMAGE_FLOW_NAMES:
        choices = ", ".join((*IMAGE_FLOWS.names(), "none"))
        raise ValueError(f"unknown flow {name!r} for the ResNet VAE; choose one of {choices}")
    if steps < 0:
        raise ValueError(f"flow_steps must be >= 0, got {steps}")
    if name == "none":
        return []
    step: ImageStep = IMAGE_FLOWS[name]
    out: list[Flow] = []
    for k in range(steps):
        out += step(channels, k, hidden, context_channels)
    return out
