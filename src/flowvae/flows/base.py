"""The flow contract, composition, and the one mechanism for global vs amortized parameters.

Every flow maps ``z -> z'`` in the *sampling/posterior direction* (z₀ → z_K):

    z_new, log_abs_det = flow(z, context=None)

``z`` has shape ``(*batch, *event)`` where ``event`` is ``(dim,)`` for vector flows
(``event_dim == 1``) or ``(C, H, W)`` for image flows (``event_dim == 3``); ``log_abs_det`` has
shape ``batch`` and is the exact ``log |det ∂z'/∂z|``.  ``inverse`` returns ``(z, log|det ∂z/∂z'|)``
where it exists.  ``context`` is the encoder's feature vector h of shape ``(*batch_c, context_dim)``
whose batch shape must broadcast *to* z's batch shape (e.g. h ``(B, H)`` with z ``(K, B, D)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import cast

import torch
from torch import nn


class Flow(nn.Module):
    """Base class of all invertible transforms.

    Subclasses set ``event_dim`` and implement ``forward``; ``inverse`` where it exists.
    Flows without a ``context_dim`` ignore ``context`` so that they can sit in any ``Compose``.
    """

    event_dim: int = 1
    context_dim: int | None = None
    conditioned_on_output: bool | None = None
    """Autoregressive flows: True when the conditioner reads the output (MAF: one-pass inverse, forward
    sequential), False when it reads the input (IAF: one-pass forward, inverse sequential); None otherwise."""

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward_per_channel(
        self, z: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` with log|det| split over the feature axis (``-event_dim``, the channels C of an
        image flow): (z', (*batch, C)) summing to ``forward``'s log-det.  By default each channel gets
        an equal share; a flow whose log-det is a sum over elements (ConvIAF) splits it exactly."""
        z, log_abs_det = self(z, context)
        return z, log_abs_det.unsqueeze(-1) / z.shape[-self.event_dim]

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no inverse in closed form")

    @property
    def has_inverse(self) -> bool:
        return type(self).inverse is not Flow.inverse

    def batch_shape(self, z: torch.Tensor) -> torch.Size:
        return z.shape[: z.dim() - self.event_dim]

    def _check(self, z: torch.Tensor, features: int, context: torch.Tensor | None) -> None:
        """Validate z's event shape (size ``features`` on the feature axis) and the context."""
        name = type(self).__name__
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"{name} expects a floating-point tensor, got {type(z).__name__}")
        if z.dim() < self.event_dim:
            raise ValueError(
                f"{name} expects z with at least {self.event_dim} dimension(s), got shape {tuple(z.shape)}"
            )
        axis = z.dim() - self.event_dim
        if z.shape[axis] != features:
            expected = f"(..., {features})" if self.event_dim == 1 else f"(..., {features}, H, W)"
            raise ValueError(f"{name} expects z of shape {expected}, got shape {tuple(z.shape)}")
        check_context(name, self.context_dim, context, self.batch_shape(z))


def check_context(name: str, context_dim: int | None, context: torch.Tensor | None, batch_shape: torch.Size) -> None:
    """Raise a one-line error if a conditional flow gets no context or a context of the wrong shape."""
    if context_dim is None:
        return
    if context is None:
        raise ValueError(f"{name} was built with context_dim={context_dim} and needs context=h, got None")
    if context.dim() < 1 or context.shape[-1] != context_dim:
        raise ValueError(f"{name} expects context with last dimension {context_dim}, got shape {tuple(context.shape)}")
    check_broadcast(name, context.shape[:-1], batch_shape)


def check_broadcast(name: str, context_batch: torch.Size, batch_shape: torch.Size) -> None:
    """One-line error unless the context's batch shape broadcasts to z's."""
    try:
        broadcast = torch.broadcast_shapes(batch_shape, context_batch)
    except RuntimeError:
        broadcast = None
    if broadcast != batch_shape:
        raise ValueError(
            f"{name}: context batch shape {tuple(context_batch)} does not broadcast to "
            f"z's batch shape {tuple(batch_shape)}"
        )


class Compose(Flow):
    """A sequence of flows applied in order; log-determinants add up.

    Examples:
        >>> import torch
        >>> from flowvae.flows import Planar, Radial
        >>> flow = Compose(Planar(2, steps=2), Radial(2))
        >>> z, log_abs_det = flow(torch.randn(4, 2))
        >>> tuple(z.shape), tuple(log_abs_det.shape)
        ((4, 2), (4,))
    """

    def __init__(self, *flows: Flow | Iterable[Flow]) -> None:
        super().__init__()
        if len(flows) == 1 and not isinstance(flows[0], nn.Module):
            members = tuple(flows[0])
        else:
            members = cast("tuple[Flow, ...]", flows)
        if not members:
            raise ValueError("Compose needs at least one flow")
        event_dims = {f.event_dim for f in members}
        if len(event_dims) != 1:
            raise ValueError(f"Compose got flows with different event_dim {sorted(event_dims)}")
        self.flows = nn.ModuleList(members)
        self.event_dim = event_dims.pop()
        dims = {f.context_dim for f in members if f.context_dim is not None}
        if len(dims) > 1:
            raise ValueError(f"Compose got flows with different context_dim {sorted(dims)}")
        self.context_dim = dims.pop() if dims else None

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        total = None
        for flow in self.flows:
            z, log_abs_det = flow(z, context)
            total = log_abs_det if total is None else total + log_abs_det
        assert total is not None  # Compose holds at least one flow
        return z, total

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        total = z.new_zeros(self.batch_shape(z))
        for flow in cast("Iterable[Flow]", reversed(self.flows)):
            z, log_abs_det = flow.inverse(z, context)
            total = total + log_abs_det
        return z, total

    @property
    def has_inverse(self) -> bool:
        return all(f.has_inverse for f in self.flows)

    def __len__(self) -> int:
        return len(self.flows)

    def __getitem__(self, index: int) -> Flow:
        return cast(Flow, self.flows[index])


class Inverse(Flow):
    """Swaps a flow's directions: ``Inverse(f).forward == f.inverse``.

    Examples:
        >>> import torch
        >>> from flowvae.flows import Radial
        >>> flow, z0 = Radial(3), torch.randn(4, 3)
        >>> z, log_abs_det = flow(z0)
        >>> back, minus = Inverse(flow)(z)
        >>> torch.allclose(back, z0, atol=1e-5), torch.allclose(minus, -log_abs_det, atol=1e-5)
        (True, True)
    """

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        if not flow.has_inverse:
            raise ValueError(f"{type(flow).__name__} has no inverse, so it cannot be wrapped in Inverse")
        self.flow = flow
        self.event_dim = flow.event_dim
        self.context_dim = flow.context_dim

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow.inverse(z, context)

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow(z, context)


Initializer = Callable[[torch.Tensor], object]  # in place; what it returns is ignored


class FlowParameters(nn.Module):
    """The parameters of a flow, either global or amortized (produced per example from h).

    With ``context_dim=None`` each named parameter is an ``nn.Parameter`` of its declared shape
    (global, as in a plain normalizing flow).  With ``context_dim=H`` a linear head maps the
    encoder's h ``(*batch, H)`` to all parameters at once, each of shape ``(*batch, *shape)`` —
    the amortized flows of Rezende & Mohamed (2015) and van den Berg et al. (2018).  The head's
    bias starts at the global initial values and its weight near zero, so both start alike.

    With ``steps=T`` the parameters of T steps of one flow are kept together, each of shape
    ``(T, *shape)`` (global: one tensor per name) or ``(*batch, T, *shape)`` (amortized: one head
    for all T steps), so that a stack of T steps costs a few large operations, not T small ones.

    Args:
        shapes: name -> (shape, initializer) with the initializer filling a tensor in place.
        context_dim: size of h, or None for global parameters.
        steps: None for one step's parameters, or T for T steps' parameters stacked.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[tuple[int, ...], Initializer]],
        context_dim: int | None = None,
        steps: int | None = None,
    ) -> None:
        super().__init__()
        if steps is not None and steps < 1:
            raise ValueError(f"FlowParameters needs steps >= 1 or None, got {steps}")
        self.shapes = {name: tuple(shape) for name, (shape, _) in shapes.items()}
        self.context_dim, self.steps = context_dim, steps
        stack = () if steps is None else (steps,)
        initial = {}
        for name, (shape, init) in shapes.items():
            value = torch.empty(stack + tuple(shape))
            init(value)
            initial[name] = value
        self.sizes = [math.prod(shape) for shape in self.shapes.values()]
        if context_dim is None:
            self.values = nn.ParameterDict({name: nn.Parameter(v) for name, v in initial.items()})
        else:
            self.head = nn.Linear(context_dim, (steps or 1) * sum(self.sizes))
            with torch.no_grad():
                self.head.weight.uniform_(-1e-2 / math.sqrt(context_dim), 1e-2 / math.sqrt(context_dim))
                # Step-major: the head's outputs are [step 0: every name, step 1: every name, ...].
                self.head.bias.copy_(torch.cat([v.reshape(steps or 1, -1) for v in initial.values()], -1).reshape(-1))

    def forward(self, context: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.context_dim is None:
            return dict(self.values.items())
        flat = self.head(context)
        return self._unpack(flat if self.steps is None else flat.unflatten(-1, (self.steps, sum(self.sizes))))

    def _unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The head's output (*batch, Σ sizes) as named parameters (*batch, *shape)."""
        batch = tuple(flat.shape[:-1])  # () for an unbatched h
        return {
            name: chunk.reshape(batch + shape)
            for (name, shape), chunk in zip(self.shapes.items(), flat.split(self.sizes, dim=-1))
        }


def normal_init(std: float) -> Initializer:
    return lambda t: nn.init.normal_(t, 0.0, std)


def constant_init(value: float) -> Initializer:
    return lambda t: nn.init.constant_(t, value)
