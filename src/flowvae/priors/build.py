"""The prior registry: name -> builder, as ``flowvae train --prior NAME`` picks one.

A builder takes the event shape and every option of :func:`build_prior` by keyword (ignoring those
it does not use) and returns a :class:`~flowvae.priors.Prior`.  A new prior registers here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from flowvae.priors.base import Prior, StandardNormalPrior, as_event_shape
from flowvae.priors.flow import build_flow_prior
from flowvae.priors.vamp import Encode, VampPrior
from flowvae.registry import Registry

PriorBuilder = Callable[..., Prior]
PRIORS: Registry[PriorBuilder] = Registry("prior")


@PRIORS.register("standard")
def _standard(event_shape: tuple[int, ...], **options: Any) -> Prior:
    return StandardNormalPrior(event_shape)


@PRIORS.register("flow")
def _flow(event_shape: tuple[int, ...], *, flow: str | None, steps: int, hidden: int, **options: Any) -> Prior:
    return build_flow_prior(event_shape, flow, steps, hidden)


@PRIORS.register("vamp")
def _vamp(
    event_shape: tuple[int, ...],
    *,
    n_pseudo: int,
    image_shape: Sequence[int] | None,
    encode: Encode | None,
    pseudo_init: torch.Tensor | None,
    **options: Any,
) -> Prior:
    if len(event_shape) != 1:
        raise ValueError(f"the vamp prior needs vector latents (D,), got event_shape {event_shape}")
    if image_shape is None or encode is None:
        raise ValueError("the vamp prior needs image_shape and encode (the model's Gaussian encoder)")
    return VampPrior(n_pseudo, image_shape, encode, pseudo_init, latent_dim=event_shape[0])


PRIOR_NAMES = PRIORS.names()


def build_prior(
    name: str,
    event_shape: int | Sequence[int],
    *,
    flow: str | None = None,
    steps: int = 4,
    hidden: int = 320,
    n_pseudo: int = 500,
    image_shape: Sequence[int] | None = None,
    encode: Encode | None = None,
    pseudo_init: torch.Tensor | None = None,
) -> Prior:
    """The prior called ``name`` (one of :data:`PRIORS`) over ``event_shape``.

    'standard': N(0, I).  'flow': :func:`build_flow_prior` with ``flow``, ``steps``, ``hidden``.
    'vamp': :class:`VampPrior` with ``n_pseudo`` pseudo-inputs of ``image_shape`` scored by
    ``encode``; it needs vector latents (D,).

    Returns:
        A :class:`Prior`: ``log_prob(z)`` (…, D) -> (…) and ``sample(n, generator)``.

    Examples:
        >>> import torch
        >>> prior = build_prior("flow", (4,), flow="maf", steps=2, hidden=16)
        >>> prior.log_prob(torch.randn(10, 4)).shape, prior.sample(3).shape
        (torch.Size([10]), torch.Size([3, 4]))
    """
    return PRIORS[name](
        as_event_shape(event_shape),
        flow=flow,
        steps=steps,
        hidden=hidden,
        n_pseudo=n_pseudo,
        image_shape=image_shape,
        encode=encode,
        pseudo_init=pseudo_init,
    )
