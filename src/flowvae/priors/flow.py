"""Flow priors: N(0, I) pushed through a flow whose density direction is one network pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flowvae.distributions import standard_normal_log_prob
from flowvae.flows.autoregressive import MAF
from flowvae.flows.base import Compose, Flow, Inverse
from flowvae.flows.glow import ActNorm, AffineCoupling, InvertibleConv1x1
from flowvae.priors.base import Prior, as_event_shape
from flowvae.registry import Registry


def has_one_pass_density(flow: Flow) -> bool:
    """Whether ``flow.inverse`` (z → u, the density direction) costs one network pass.

    MAF, coupling, ActNorm, invertible 1x1 convolutions, permutations, and any flow with an
    inverse that is not autoregressive are one pass; IAF's inverse takes D passes (one per
    degree), and planar and Sylvester flows have no inverse.  ``Inverse(f)`` is one pass when f's
    forward is (so ``Inverse(IAF(...))`` qualifies), and a ``Compose`` when all its steps are.
    """
    return _not_one_pass(flow, density=True) is None


def _not_one_pass(flow: Flow, density: bool) -> str | None:
    """The name of the first step of ``flow`` that takes more than one pass in that direction, or None."""
    if isinstance(flow, Compose):
        return next((name for f in flow.flows if (name := _not_one_pass(f, density)) is not None), None)
    if isinstance(flow, Inverse):
        inner = _not_one_pass(flow.flow, not density)
        return None if inner is None else f"Inverse({inner})"
    if density and not flow.has_inverse:
        return type(flow).__name__
    if flow.conditioned_on_output is not None and flow.conditioned_on_output != density:  # IAF, MAF
        return type(flow).__name__
    return None


class FlowPrior(Prior):
    """p(z) of z = f(u), u ~ N(0, I), for an unconditional flow f (Chen et al. 2017's flow prior).

        log p(z) = log N(u; 0, I) + log |det ∂u/∂z|,   u = f⁻¹(z)

    is one pass of ``flow.inverse`` (the density direction), which must therefore be cheap: MAF
    (Papamakarios et al. 2017), affine coupling, or Glow steps (ActNorm, invertible 1x1
    convolution, coupling) for spatial latents; see :func:`has_one_pass_density`.  Sampling runs
    ``flow`` forward (for MAF, D sequential passes).  ActNorm layers are marked initialised and
    start as the identity: their data-dependent initialisation would otherwise run on the base
    noise of the first ``sample`` call.

    Args:
        event_shape: ``(D,)`` or ``(C, H, W)``, matching ``flow.event_dim``.
        flow: a :class:`~flowvae.flows.Flow` without context, with a one-pass inverse.

    >>> prior = FlowPrior((3,), Compose(MAF(3, (8, 8)), MAF(3, (8, 8), order="reversed")))
    >>> prior.log_prob(prior.sample(4)).shape
    torch.Size([4])
    """

    closed_form_kl = False

    def __init__(self, event_shape: int | Sequence[int], flow: Flow) -> None:
        super().__init__(event_shape)
        if not isinstance(flow, Flow):
            raise TypeError(f"FlowPrior needs a flowvae Flow, got {type(flow).__name__}")
        if flow.event_dim != len(self.event_shape):
            raise ValueError(
                f"FlowPrior over event_shape {self.event_shape} needs a flow with event_dim "
                f"{len(self.event_shape)}, got event_dim {flow.event_dim}"
            )
        if flow.context_dim is not None:
            raise ValueError(f"a prior is unconditional, but the flow was built with context_dim={flow.context_dim}")
        offender = _not_one_pass(flow, density=True)
        if offender is not None:
            raise ValueError(
                f"FlowPrior needs a flow whose inverse (density direction) is one pass, such as "
                f"MAF, coupling or Glow steps; {offender} is not"
            )
        for module in flow.modules():
            if isinstance(module, ActNorm):
                module.initialized.fill_(True)
        self.flow = flow

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        u, log_abs_det = self.flow.inverse(z)
        return standard_normal_log_prob(u.flatten(u.dim() - len(self.event_shape))) + log_abs_det

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        return self.flow(self._randn(n, *self.event_shape, generator=generator))[0]


@dataclass(frozen=True)
class FlowPriorFamily:
    """A family of flow-prior steps: ``step(channels, k, hidden)`` gives step k's flows over latents
    with ``event_dim`` (1: vectors (D,), 3: spatial (C, H, W)) of at least ``min_channels`` channels."""

    event_dim: int
    step: Callable[[int, int, int], list[Flow]]
    min_channels: int = 1


FLOW_PRIORS: Registry[FlowPriorFamily] = Registry("flow prior")
"""The families of :func:`build_flow_prior`, in the order of their defaults (the first of each event_dim)."""

FLOW_PRIORS.register("maf")(
    FlowPriorFamily(
        1, lambda channels, k, hidden: [MAF(channels, (hidden, hidden), order="natural" if k % 2 == 0 else "reversed")]
    )
)
FLOW_PRIORS.register("coupling")(
    FlowPriorFamily(
        1, lambda channels, k, hidden: [AffineCoupling(channels, hidden, event_dim=1, swap=k % 2 == 1)], min_channels=2
    )
)
FLOW_PRIORS.register("glow")(
    FlowPriorFamily(
        3,
        lambda channels, k, hidden: [
            ActNorm(channels),
            InvertibleConv1x1(channels),
            AffineCoupling(channels, hidden, event_dim=3, swap=k % 2 == 1),
        ],
        min_channels=2,
    )
)
FLOW_PRIOR_NAMES = FLOW_PRIORS.names()


def build_flow_prior(
    event_shape: int | Sequence[int], flow: str | None = None, steps: int = 4, hidden: int = 320
) -> FlowPrior:
    """A :class:`FlowPrior` of ``steps`` steps of one family.

    Vectors ``(D,)``: ``flow='maf'`` (the default; MADEs with two hidden layers of ``hidden``
    units, orderings alternating natural/reversed) or ``'coupling'`` (affine coupling, MLP
    conditioner, halves alternating).  Spatial latents ``(C, H, W)``: ``'glow'`` (the default),
    steps of ActNorm, invertible 1x1 convolution and affine coupling with a ``hidden``-channel
    conv net, halves alternating.  Every step starts at (or near) the identity, so the prior starts
    at (or near) N(0, I).
    """
    shape = as_event_shape(event_shape)
    if len(shape) not in (1, 3):
        raise ValueError(f"a flow prior needs event_shape (D,) or (C, H, W), got {shape}")
    spatial = len(shape) == 3
    flow = next(n for n in FLOW_PRIORS if (FLOW_PRIORS[n].event_dim == 3) == spatial) if flow is None else flow
    if flow not in FLOW_PRIOR_NAMES:
        raise ValueError(
            f"flow prior {flow!r} must be one of {', '.join(FLOW_PRIOR_NAMES)} "
            "(families whose density direction is one pass; IAF, planar, radial and Sylvester are not)"
        )
    family = FLOW_PRIORS[flow]
    if (family.event_dim == 3) != spatial:
        vectors, images = ([repr(n) for n in FLOW_PRIORS if FLOW_PRIORS[n].event_dim == d] for d in (1, 3))
        raise ValueError(
            f"flow prior {flow!r} does not fit event_shape {shape}: use {' or '.join(vectors)} for "
            f"vectors (D,) and {' or '.join(images)} for spatial latents (C, H, W)"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"a flow prior needs steps >= 1, got {steps!r}")
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"a flow prior needs hidden >= 1, got {hidden!r}")
    channels = shape[0]
    if channels < family.min_channels:
        raise ValueError(
            f"a {flow} prior splits {'channels' if spatial else 'features'} in two and needs at least 2, "
            f"got event_shape {shape}"
        )
    parts: list[Flow] = []
    for k in range(steps):
        parts += family.step(channels, k, hidden)
    return FlowPrior(shape, Compose(parts))
