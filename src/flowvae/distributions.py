"""Base distributions and the distribution of a flow-transformed sample, as ``torch.distributions.Distribution``
subclasses that code written against torch.distributions can use; :mod:`flowvae.flows.interop` has the Transforms."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import distributions as D
from torch import nn
from torch.distributions import constraints
from torch.distributions.utils import _sum_rightmost

from flowvae.flows.base import Flow
from flowvae.flows.interop import IdentityCache

LOG_2PI = math.log(2.0 * math.pi)

# torch.distributions' ``_size``: the shapes ``sample``/``rsample``/``expand`` accept
Shape = torch.Size | list[int] | tuple[int, ...]


def diagonal_gaussian(mean: torch.Tensor, log_std: torch.Tensor) -> D.Independent:
    """N(mean, diag(exp(log_std))²) as a torch distribution with event shape (D,).

    Argument validation is off: it costs a device sync per call on the training hot path.

    >>> diagonal_gaussian(torch.zeros(5, 3), torch.zeros(5, 3)).log_prob(torch.zeros(5, 3)).shape
    torch.Size([5])
    """
    return D.Independent(D.Normal(mean, torch.exp(log_std), validate_args=False), 1, validate_args=False)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last axis: (..., D) -> (...)."""
    return -0.5 * (z * z + LOG_2PI).sum(-1)


def gaussian_log_density(eps: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; μ, σ²) at z = μ + σ · eps: −½ eps² − log σ − ½ log 2π (no sum).

    >>> zero = torch.zeros(1, dtype=torch.float64)
    >>> float(gaussian_log_density(zero, zero)[0]) == -0.5 * LOG_2PI
    True
    """
    return -0.5 * eps * eps - log_std - 0.5 * LOG_2PI


def gaussian_log_prob(
    z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, dims: int | tuple[int, ...] = -1
) -> torch.Tensor:
    """log N(z; μ, diag exp(log σ)²) summed over ``dims``: the last axis (vectors, (…, D) -> (…)) by default,
    or ``(-2, -1)`` for the per-channel density of spatial latents ((…, C, H, W) -> (…, C)).

    >>> gaussian_log_prob(torch.zeros(5, 2, 3, 3), torch.zeros(2, 3, 3), torch.zeros(2, 3, 3), (-2, -1)).shape
    torch.Size([5, 2])
    """
    eps = (z - mean) * torch.exp(-log_std)
    return gaussian_log_density(eps, log_std).sum(dims)


def validate_value(dist: D.Distribution, value: torch.Tensor) -> None:
    """torch's ``_validate_sample`` with one-line errors: a tensor of shape (*sample, *batch, *event)
    whose batch part broadcasts with ``dist.batch_shape``, inside ``dist.support``."""
    name = type(dist).__name__
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}.log_prob expects a tensor, got {type(value).__name__}")
    event = dist.event_shape
    split = value.dim() - len(event)
    if split < 0 or value.shape[split:] != event:
        raise ValueError(
            f"{name}.log_prob expects a value of shape (..., {', '.join(map(str, event))}), got {tuple(value.shape)}"
        )
    try:
        torch.broadcast_shapes(value.shape[:split], dist.batch_shape)
    except RuntimeError:
        raise ValueError(
            f"{name}.log_prob: value of shape {tuple(value.shape)} does not broadcast with batch shape "
            f"{tuple(dist.batch_shape)}"
        ) from None
    support = dist.support
    assert support is not None, f"{name} declares no support"
    if not bool(support.check(value).all()):  # a device sync: why validation is optional
        raise ValueError(
            f"{name}.log_prob got a value of shape {tuple(value.shape)} with entries outside the "
            f"support {dist.support} (NaN for real vectors)"
        )


class StandardNormal(nn.Module, D.Distribution):
    """N(0, I) with event shape ``shape`` and batch shape ``batch_shape``.

    A ``torch.distributions.Distribution`` that is also a module: its zero ``loc`` is a buffer, so
    ``.to(device)`` / ``.double()`` move it with the model and samples follow its dtype and device.
    ``log_prob(z) = -½ Σ_event (z² + log 2π)``, shaped (*sample, *batch).
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    has_rsample = True
    loc: torch.Tensor  # a buffer

    def __init__(self, *shape: int, batch_shape: Shape = (), validate_args: bool | None = None) -> None:
        nn.Module.__init__(self)
        if any(not isinstance(n, int) or n < 1 for n in shape):
            raise ValueError(f"StandardNormal expects positive integer sizes, got {shape}")
        self.register_buffer("loc", torch.zeros(shape), persistent=False)
        D.Distribution.__init__(self, torch.Size(batch_shape), torch.Size(shape), validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def mean(self) -> torch.Tensor:
        return self.loc.expand(self._extended_shape())

    @property
    def mode(self) -> torch.Tensor:
        return self.mean

    @property
    def variance(self) -> torch.Tensor:
        return torch.ones_like(self.loc).expand(self._extended_shape())

    def rsample(self, sample_shape: Shape = ()) -> torch.Tensor:
        """ε ~ N(0, I) of shape (*sample_shape, *batch, *event), in ``loc``'s dtype and device."""
        return torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            validate_value(self, value)
        log_p = _sum_rightmost(-0.5 * (value * value + LOG_2PI), len(self.event_shape))
        return log_p.expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))

    def entropy(self) -> torch.Tensor:
        """½ n (1 + log 2π) with n = the event's size, shaped like the batch."""
        n = self.loc.numel()
        return self.loc.new_full(self.batch_shape, 0.5 * n * (1.0 + LOG_2PI))

    def expand(self, batch_shape: Shape, _instance: None = None) -> StandardNormal:
        new = type(self)(*self.event_shape, batch_shape=batch_shape, validate_args=self._validate_args)
        new.loc = self.loc
        return new

    def distribution(self) -> D.Independent:
        """The same distribution as ``Independent(Normal(loc, 1), n)``, e.g. for code that needs ``base_dist``."""
        loc = self.loc.expand(self._extended_shape())
        return D.Independent(D.Normal(loc, torch.ones_like(loc)), len(self.event_shape))

    def extra_repr(self) -> str:
        return f"batch_shape={tuple(self.batch_shape)}, event_shape={tuple(self.event_shape)}"


class FlowDistribution(D.Distribution):
    """q(z_K) for z_K = flow(z₀, h), z₀ ~ base:  log q(z_K) = log base(z₀) - log|det ∂z_K/∂z₀|.

    A ``torch.distributions.Distribution`` with the base's ``batch_shape`` and ``event_shape``
    (the flow's event_dim must equal the base's number of event dimensions).  ``base`` is any
    torch distribution (e.g. :func:`diagonal_gaussian` from an encoder), ``context`` the h the flow
    is conditioned on, shaped (*batch, H).

    * ``rsample_and_log_prob`` is the fused one-pass path used by VAEs: no validation, no cache.
    * ``rsample`` / ``sample`` draw z_K; ``log_prob(z)`` runs ``flow.inverse`` — except for the
      identical, unmodified tensor last returned by ``rsample`` (same flow parameters and context),
      whose log-det is reused, so flows without an inverse (planar, Sylvester) can score their
      own samples.
    * ``validate_args`` follows torch (None: ``Distribution``'s global default, on unless
      ``set_default_validate_args(False)``) and checks the value given to ``log_prob`` (shape and
      support, a device sync); sampling is never validated, and the flow checks h's shape itself.

    Examples:
        >>> import torch
        >>> from flowvae import flows
        >>> flow = flows.build_flow("iaf", dim=2, steps=2, context_dim=4, hidden=8)
        >>> base = diagonal_gaussian(torch.zeros(3, 2), torch.zeros(3, 2))
        >>> q = FlowDistribution(base, flow, context=torch.randn(3, 4))
        >>> z, log_q = q.rsample_and_log_prob()
        >>> tuple(z.shape), tuple(log_q.shape), torch.allclose(q.log_prob(z), log_q, atol=1e-4)
        ((3, 2), (3,), True)
    """

    arg_constraints: dict[str, constraints.Constraint] = {}

    def __init__(
        self,
        base: D.Distribution,
        flow: Flow | None = None,
        context: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(base, D.Distribution):
            raise TypeError(f"FlowDistribution expects a torch Distribution as base, got {type(base).__name__}")
        if flow is not None and flow.event_dim != len(base.event_shape):
            raise ValueError(
                f"{type(flow).__name__} has event_dim {flow.event_dim} but the base has event shape "
                f"{tuple(base.event_shape)}; use D.Independent to reinterpret batch dimensions"
            )
        self.base, self.flow, self.context = base, flow, context
        super().__init__(base.batch_shape, base.event_shape, validate_args)  # the flow checks h when it runs
        self._cache = IdentityCache(self._watched)

    def _watched(self) -> Iterable[torch.Tensor]:
        if self.flow is not None:
            yield from self.flow.parameters()
        if self.context is not None:
            yield self.context

    @property
    def support(self) -> constraints.Constraint | None:
        if self.flow is None:
            return self.base.support
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]  # torch's class attribute; here it follows the base
        return self.base.has_rsample

    def expand(self, batch_shape: Shape, _instance: FlowDistribution | None = None) -> FlowDistribution:
        """The same q over a larger batch: the base is expanded, the flow and h broadcast."""
        new = self._get_checked_instance(FlowDistribution, _instance)
        FlowDistribution.__init__(new, self.base.expand(batch_shape), self.flow, self.context, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample_and_log_prob(
        self, sample_shape: Shape = (), noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z_K and log q(z_K), (*sample_shape, *batch, D) and (*sample_shape, *batch).

        ``noise`` ε (standard normal, of z's shape) fixes the draw of a location-scale base:
        z₀ = mean + stddev · ε; without it the base's own ``rsample`` draws.
        """
        z0 = self.base.rsample(sample_shape) if noise is None else self.base.mean + self.base.stddev * noise
        log_q = self.base.log_prob(z0)
        if self.flow is None:
            return z0, log_q
        z, ladj = self._apply_flow(z0)
        return z, log_q - ladj

    def _apply_flow(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow on z₀; a sample shape of ones (one draw, as in training) is dropped first and
        restored after, so that h need not broadcast against it (fewer operations, same numbers)."""
        flow = self.flow
        assert flow is not None, "called only with a flow"
        shape = self.batch_shape + self.event_shape
        lead = z0.shape[: z0.dim() - len(shape)]
        if not lead or any(n != 1 for n in lead) or self.context is None:
            return flow(z0, self.context)
        z, ladj = flow(z0.reshape(shape), self.context)
        return z.reshape(z0.shape), ladj.reshape(lead + ladj.shape)

    def _draw(self, sample_shape: Shape, reparameterized: bool) -> torch.Tensor:
        z0 = self.base.rsample(sample_shape) if reparameterized else self.base.sample(sample_shape)
        if self.flow is None:
            return z0
        z, ladj = self.flow(z0, self.context)
        self._cache.put((z,), (z0, ladj))
        return z

    def rsample(self, sample_shape: Shape = ()) -> torch.Tensor:
        """z_K of shape (*sample_shape, *batch, *event), differentiable in the base's and flow's parameters."""
        return self._draw(sample_shape, reparameterized=True)

    def sample(self, sample_shape: Shape = ()) -> torch.Tensor:
        with torch.no_grad():
            return self._draw(sample_shape, reparameterized=self.base.has_rsample)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log q(z_K) for z_K (*sample, *batch, *event) -> (*sample, *batch)."""
        if self._validate_args:
            validate_value(self, value)
        if self.flow is None:
            return self.base.log_prob(value)
        hit = self._cache.get(value)
        if hit is not None:
            z0, ladj = hit
            return self.base.log_prob(z0) - ladj
        if not self.flow.has_inverse:
            raise NotImplementedError(
                f"{type(self.flow).__name__} has no inverse, so FlowDistribution.log_prob can "
                "score only the tensor its rsample just returned; use rsample_and_log_prob"
            )
        z0, ladj_inverse = self.flow.inverse(value, self.context)
        return self.base.log_prob(z0) + ladj_inverse

    def __repr__(self) -> str:
        flow = "None" if self.flow is None else type(self.flow).__name__
        context = "None" if self.context is None else f"shape {tuple(self.context.shape)}"
        return f"FlowDistribution(base={self.base}, flow={flow}, context={context})"
