"""Bridges between flowvae flows and ``torch.distributions.Transform`` (and so Pyro and zuko).

* :func:`as_transform` wraps a flowvae :class:`~flowvae.flows.Flow` (given its context h, if it
  is conditioned) as a ``Transform``, for ``TransformedDistribution`` and Pyro guides.
* :func:`from_transform` wraps a ``Transform`` (Pyro's, torch's, zuko's), or a module that builds
  one from a context (a zuko ``LazyTransform``, a Pyro ``ConditionalTransform``), as a flowvae
  ``Flow`` that can be the posterior flow of a VAE, conditioned on h where the source takes one.

Both keep flowvae's direction: the transform's call is the sampling direction z₀ → z_K, and
``log_abs_det_jacobian(x, y)`` = log|det ∂y/∂x| summed over the event, shaped like the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

import torch
from torch.distributions import Transform, constraints
from torch.distributions.utils import _sum_rightmost

from flowvae.flows.base import Flow, check_context

__all__ = ["FlowTransform", "TransformFlow", "as_transform", "from_transform", "IdentityCache"]


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference-mode tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return None


class IdentityCache:
    """Holds one ``(key tensors, payload)`` entry and returns the payload only for the *identical*
    key objects, unmodified in place, with the ``watched`` tensors (parameters, context) unmodified.

    This is what lets a log-determinant computed while sampling be reused when the same sample
    is scored, without scoring ever depending on an earlier call for another value (the
    stored-log-det trap of Pyro's planar flow): any other tensor, an in-place edit of the key,
    or an optimizer step on the watched parameters is a miss.
    """

    def __init__(self, watched: Callable[[], Iterable[torch.Tensor]]) -> None:
        self._watched = watched
        self._entry: tuple[tuple[torch.Tensor, ...], tuple[int | None, ...], Any] | None = None

    def _stamp(self, keys: tuple[torch.Tensor, ...]) -> tuple[int | None, ...]:
        return tuple(_version(t) for t in (*keys, *self._watched()))

    def put(self, keys: tuple[torch.Tensor, ...], payload: Any) -> None:
        stamp = self._stamp(keys)
        self._entry = None if None in stamp else (keys, stamp, payload)

    def get(self, key: torch.Tensor, position: int = 0) -> Any | None:
        """The payload stored with ``key`` at ``position`` among the keys, or None on a miss."""
        if self._entry is None:
            return None
        keys, stamp, payload = self._entry
        if keys[position] is not key or self._stamp(keys) != stamp:
            return None
        return payload


class FlowTransform(Transform):
    """A flowvae flow as a ``torch.distributions.Transform``: y = flow(x, context).

    ``log_abs_det_jacobian(x, y)`` is log|det ∂y/∂x|, shaped like the batch ``x.shape[:-event_dim]``.
    With ``cache_size=1`` (the default) the last ``(x, y, log-det)`` is kept, so scoring a value
    just produced (``TransformedDistribution.log_prob(rsample())``, a Pyro guide) reuses the
    log-det and needs no inverse; it is reused only for the identical, unmodified x (or y) under
    unmodified flow parameters and context.  Any other value is recomputed, through
    ``flow.inverse`` in the inverse direction (an error for flows without one).
    """

    bijective = True

    def __init__(self, flow: Flow, context: torch.Tensor | None = None, cache_size: int = 1) -> None:
        if not isinstance(flow, Flow):
            raise TypeError(f"as_transform expects a flowvae Flow, got {type(flow).__name__}")
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size}")
        batch = torch.Size() if context is None else context.shape[:-1]  # z is not known yet: check h alone
        check_context(type(flow).__name__, flow.context_dim, context, batch)
        super().__init__(cache_size=cache_size)
        self.flow, self.context = flow, context
        self._ladj_cache = IdentityCache(self._watched)

    def _watched(self) -> Iterable[torch.Tensor]:
        yield from self.flow.parameters()
        if self.context is not None:
            yield self.context

    # torch declares domain and codomain as class attributes; here they follow the flow's event_dim
    @property
    def domain(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.real, self.flow.event_dim)

    @property
    def codomain(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.real, self.flow.event_dim)

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        return self if cache_size == self._cache_size else FlowTransform(self.flow, self.context, cache_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hit = self._ladj_cache.get(x, 0) if self._cache_size else None
        return hit[0] if hit is not None else self._forward_and_store(x)

    def _inv_call(self, y: torch.Tensor) -> torch.Tensor:
        hit = self._ladj_cache.get(y, 1) if self._cache_size else None
        if hit is not None:
            return hit[1]
        if not self.flow.has_inverse:
            raise NotImplementedError(
                f"{type(self.flow).__name__} has no inverse: this transform can only score the "
                "values it produced, as in TransformedDistribution.log_prob(rsample())"
            )
        x, ladj_inverse = self.flow.inverse(y, self.context)
        if self._cache_size:
            self._ladj_cache.put((x, y), (y, x, -ladj_inverse))
        return x

    def _forward_and_store(self, x: torch.Tensor) -> torch.Tensor:
        y, ladj = self.flow(x, self.context)
        if self._cache_size:
            self._ladj_cache.put((x, y), (y, x, ladj))
        return y

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow(x, self.context)[0]

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._inv_call(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log|det ∂y/∂x| for x → y, shaped ``x.shape[:-event_dim]``; one flow pass unless cached."""
        hit = self._ladj_cache.get(x, 0) if self._cache_size else None
        if hit is not None and hit[0] is y:
            return hit[2]
        return self.flow(x, self.context)[1]

    def __repr__(self) -> str:
        context = "None" if self.context is None else f"shape {tuple(self.context.shape)}"
        return f"FlowTransform({type(self.flow).__name__}, context={context})"


def as_transform(flow: Flow, context: torch.Tensor | None = None, cache_size: int = 1) -> FlowTransform:
    """``flow`` (conditioned on ``context`` h, shaped (*batch, H)) as a torch ``Transform``.

    Examples:
        >>> import torch
        >>> from torch import distributions as D
        >>> from flowvae import flows
        >>> flow = flows.build_flow("iaf", 3, 2, hidden=8)
        >>> q = D.TransformedDistribution(D.Independent(D.Normal(torch.zeros(3), 1.0), 1), [flows.as_transform(flow)])
        >>> z = q.rsample((5,))
        >>> q.log_prob(z).shape
        torch.Size([5])
    """
    return FlowTransform(flow, context, cache_size)


Source = Transform | Callable[[torch.Tensor | None], Transform]


class _Conditional(Protocol):
    """A Pyro ``ConditionalTransform``: ``condition(h)`` gives the Transform for context h."""

    def condition(self, context: torch.Tensor | None) -> Transform: ...


class TransformFlow(Flow):
    """A ``torch.distributions.Transform``, or a module that builds one from a context, as a flowvae ``Flow``.

    ``forward(z, h)`` = (t(z), log|det ∂t(z)/∂z| summed over the event) with t the transform, or
    ``source(h)`` (zuko ``LazyTransform``), or ``source.condition(h)`` (Pyro ``ConditionalTransform``).
    Transforms of lower event_dim (Pyro's elementwise ``Spline``) have their log-dets summed
    over the rest of the event.  Modules (Pyro ``TransformModule``, zuko) are registered as
    submodules, so their parameters train and move with the model.
    """

    def __init__(
        self, source: Source, context_dim: int | None = None, event_dim: int = 1, features: int | None = None
    ) -> None:
        super().__init__()
        if event_dim < 1:
            raise ValueError(f"event_dim must be >= 1, got {event_dim}")
        if isinstance(source, Transform):
            kind = "transform"
            if context_dim is not None:
                raise ValueError(f"a plain {type(source).__name__} takes no context, so context_dim must be None")
            if source.domain.event_dim > event_dim:
                raise ValueError(
                    f"{type(source).__name__} acts on events of {source.domain.event_dim} dimensions, "
                    f"more than event_dim={event_dim}"
                )
        elif callable(getattr(source, "condition", None)):
            kind = "condition"
            if context_dim is None:
                raise ValueError(f"{type(source).__name__} is conditional (it has .condition), so pass context_dim=H")
        elif callable(source):
            kind = "lazy"
        else:
            raise TypeError(
                f"from_transform expects a torch Transform or a module context -> Transform, "
                f"got {type(source).__name__}"
            )
        self.source, self.kind = source, kind
        self.context_dim, self.event_dim, self.features = context_dim, event_dim, features

    def transform(self, context: torch.Tensor | None = None) -> Transform:
        """The torch ``Transform`` of this flow for context h (ignored by unconditional sources)."""
        if self.kind == "transform":
            return cast(Transform, self.source)
        if self.kind == "condition":
            return cast(_Conditional, self.source).condition(context)
        transform = self.source(context if self.context_dim is not None else None)
        if not isinstance(transform, Transform):
            raise TypeError(
                f"{type(self.source).__name__}(context) returned {type(transform).__name__}, not a torch "
                "Transform (for a zuko Flow, pass flow.transform)"
            )
        return transform

    @property
    def has_inverse(self) -> bool:
        return cast(Transform, self.source).bijective if self.kind == "transform" else True

    def _check_input(self, z: torch.Tensor, context: torch.Tensor | None) -> None:
        if self.features is not None:
            return self._check(z, self.features, context)
        name = type(self).__name__
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"{name} expects a floating-point tensor, got {type(z).__name__}")
        if z.dim() < self.event_dim:
            raise ValueError(
                f"{name} expects z with at least {self.event_dim} dimension(s), got shape {tuple(z.shape)}"
            )
        check_context(name, self.context_dim, context, self.batch_shape(z))

    def _call_and_ladj(self, transform: Transform, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(transform, "call_and_ladj"):  # zuko's fused call: one pass of its hyper-network, not two
            y, ladj = transform.call_and_ladj(z)
        else:
            y = transform(z)
            ladj = transform.log_abs_det_jacobian(z, y)
        ladj = _sum_rightmost(ladj, self.event_dim - transform.domain.event_dim)
        batch = self.batch_shape(z)
        if ladj.shape != batch:
            try:
                ladj = ladj.expand(batch)  # a log-det constant over the batch, e.g. a global affine map
            except RuntimeError:
                raise ValueError(
                    f"{type(transform).__name__} returned a log-det of shape {tuple(ladj.shape)} for "
                    f"z of batch shape {tuple(batch)}"
                ) from None
        return y, ladj

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(z, context)
        return self._call_and_ladj(self.transform(context), z)

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(z, context)
        if not self.has_inverse:
            raise NotImplementedError(f"{type(self.source).__name__} is not bijective, so it has no inverse")
        return self._call_and_ladj(self.transform(context).inv, z)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, event_dim={self.event_dim}, context_dim={self.context_dim}"


def from_transform(
    transform: Source, context_dim: int | None = None, event_dim: int = 1, features: int | None = None
) -> TransformFlow:
    """Wrap a torch/Pyro/zuko transform as a flowvae ``Flow`` in the sampling direction z₀ → z_K.

    Args:
        transform: a ``torch.distributions.Transform`` (e.g. Pyro's ``Spline``, a zuko transform);
            a module ``h -> Transform`` such as zuko's ``NSF(D, H).transform``; or a Pyro
            ``ConditionalTransform`` (``.condition(h)``).  Pass ``t.inv`` to use the other direction.
        context_dim: H, for sources that are conditioned on the encoder's h (required for those).
        event_dim: 1 for vectors (…, D).
        features: D, if given z's last axis is checked against it.

    Examples:
        >>> import torch, zuko
        >>> nsf = zuko.flows.NSF(4, context=6, transforms=2, hidden_features=(16, 16))
        >>> flow = from_transform(nsf.transform, context_dim=6, features=4)
        >>> z, ladj = flow(torch.randn(10, 4), torch.randn(10, 6))
        >>> z.shape, ladj.shape
        (torch.Size([10, 4]), torch.Size([10]))
    """
    return TransformFlow(transform, context_dim, event_dim, features)
