"""Unnormalized 2-D target densities p(z) ∝ exp(−U(z)) for fitting flows by reverse KL.

U1–U4 are the four energies of Rezende & Mohamed (2015), Table 1, written exactly as printed
(in U3 and U4 the second terms read ``z2 − w1 + w2`` and ``z2 − w1 + w3``; a widely copied
transcription flips that sign).  The other targets have a normaliser known in closed form, so the
log Z estimates can be checked against the truth: a correlated Gaussian, well-separated Gaussian
mixtures (2 and 8 modes), a banana (a sheared Gaussian) and a ring.

Every energy maps z of shape ``(..., 2)`` to U of shape ``(...)`` and works in any float dtype.

Note that U2, U3 and U4 do not depend on z1 except through the periodic w1, w2, w3: their
integral over ℝ² diverges (the paper only ever draws them on [−4, 4]²), and a flow fitted to them
by reverse KL keeps stretching q along z1, out of the picture.  The registry's ``u2``–``u4`` are
therefore the exact energies inside the window |z1| <= 4 plus a soft wall outside it
(:func:`confine_z1`), which makes them proper, so that log Z and KL(q ‖ p) are defined.  The bare
energies are ``u2``, ``u3``, ``u4`` in this module; wrap one as ``Target("u2-open", u2, proper=False)``
to fit it unconfined (:mod:`flowvae.toy.metrics` then reports no KL).

References:
    D. Rezende and S. Mohamed. Variational Inference with Normalizing Flows. ICML 2015.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Energy = Callable[[torch.Tensor], torch.Tensor]
Box = tuple[float, float, float, float]
DEFAULT_BOX: Box = (-4.0, 4.0, -4.0, 4.0)


def _split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if z.shape[-1] != 2:
        raise ValueError(f"toy energies take z of shape (..., 2), got shape {tuple(z.shape)}")
    return z[..., 0], z[..., 1]


def w1(z: torch.Tensor) -> torch.Tensor:
    """w1(z) = sin(2π z1 / 4)."""
    return torch.sin(0.5 * math.pi * z[..., 0])


def w2(z: torch.Tensor) -> torch.Tensor:
    """w2(z) = 3 exp(−½ ((z1 − 1) / 0.6)²)."""
    return 3.0 * torch.exp(-0.5 * ((z[..., 0] - 1.0) / 0.6) ** 2)


def w3(z: torch.Tensor) -> torch.Tensor:
    """w3(z) = 3 σ((z1 − 1) / 0.3), σ the logistic sigmoid."""
    return 3.0 * torch.sigmoid((z[..., 0] - 1.0) / 0.3)


def u1(z: torch.Tensor) -> torch.Tensor:
    """U1(z) = ½ ((‖z‖ − 2) / 0.4)² − ln(exp(−½ ((z1 − 2) / 0.6)²) + exp(−½ ((z1 + 2) / 0.6)²)).

    A ring of radius 2 with two lobes on the z1 axis.  The log-sum is a ``logaddexp``.
    """
    z1, _ = _split(z)
    radius = torch.linalg.vector_norm(z, dim=-1)
    return 0.5 * ((radius - 2.0) / 0.4) ** 2 - torch.logaddexp(
        -0.5 * ((z1 - 2.0) / 0.6) ** 2, -0.5 * ((z1 + 2.0) / 0.6) ** 2
    )


def u2(z: torch.Tensor) -> torch.Tensor:
    """U2(z) = ½ ((z2 − w1(z)) / 0.4)²: a sine wave.  Improper in z1."""
    _, z2 = _split(z)
    return 0.5 * ((z2 - w1(z)) / 0.4) ** 2


def u3(z: torch.Tensor) -> torch.Tensor:
    """U3(z) = −ln(exp(−½ ((z2 − w1) / 0.35)²) + exp(−½ ((z2 − w1 + w2) / 0.35)²)).  Improper in z1."""
    _, z2 = _split(z)
    a = z2 - w1(z)
    return -torch.logaddexp(-0.5 * (a / 0.35) ** 2, -0.5 * ((a + w2(z)) / 0.35) ** 2)


def u4(z: torch.Tensor) -> torch.Tensor:
    """U4(z) = −ln(exp(−½ ((z2 − w1) / 0.4)²) + exp(−½ ((z2 − w1 + w3) / 0.35)²)).  Improper in z1."""
    _, z2 = _split(z)
    a = z2 - w1(z)
    return -torch.logaddexp(-0.5 * (a / 0.4) ** 2, -0.5 * ((a + w3(z)) / 0.35) ** 2)


@dataclass(frozen=True)
class Target:
    """An unnormalized 2-D density p(z) ∝ exp(−U(z)).

    Attributes:
        name: registry key.
        energy: U, mapping ``(..., 2) -> (...)``.
        box: (z1_min, z1_max, z2_min, z2_max), the plotting window.
        log_z: log ∫ exp(−U) over ℝ² when known in closed form, else None.
        proper: True when ∫ exp(−U) over ℝ² is finite *and* the quadrature box holds all but a
            negligible part of it, so that quadrature gives log Z.
        description: one line for tables and plots.
        quadrature_box: the domain of quadrature when it must be larger than ``box``.
    """

    name: str
    energy: Energy = field(repr=False)
    box: Box = DEFAULT_BOX
    log_z: float | None = None
    proper: bool = True
    description: str = ""
    quadrature_box: Box | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.energy(z)

    def log_unnormalized_density(self, z: torch.Tensor) -> torch.Tensor:
        """−U(z)."""
        return -self.energy(z)


def gaussian_target(
    mean: Sequence[float], cov: Sequence[Sequence[float]], name: str = "gaussian", box: Box = DEFAULT_BOX
) -> Target:
    """U(z) = ½ (z − μ)ᵀ Σ⁻¹ (z − μ), so Z = 2π √det Σ."""
    mu = torch.tensor(mean, dtype=torch.float64)
    sigma = torch.tensor(cov, dtype=torch.float64)
    if mu.shape != (2,) or sigma.shape != (2, 2):
        raise ValueError(
            f"gaussian_target needs a mean of shape (2,) and a covariance (2, 2), "
            f"got {tuple(mu.shape)} and {tuple(sigma.shape)}"
        )
    precision = torch.linalg.inv(sigma)
    log_z = math.log(2.0 * math.pi) + 0.5 * torch.logdet(sigma).item()

    def energy(z: torch.Tensor) -> torch.Tensor:
        _split(z)
        d = z - mu.to(z)
        return 0.5 * ((d @ precision.to(z)) * d).sum(-1)

    return Target(name, energy, box, log_z, True, f"Gaussian, mean {list(mean)}, covariance {[list(r) for r in cov]}")


def mixture_target(means: Sequence[Sequence[float]], std: float, name: str, box: Box = DEFAULT_BOX) -> Target:
    """Equal-weight isotropic mixture, U(z) = −log Σ_k exp(−‖z − μ_k‖² / (2 s²)), so Z = K · 2π s²."""
    mu = torch.tensor(means, dtype=torch.float64)
    if mu.dim() != 2 or mu.shape[-1] != 2:
        raise ValueError(f"mixture_target needs means of shape (K, 2), got {tuple(mu.shape)}")
    log_z = math.log(mu.shape[0] * 2.0 * math.pi * std * std)

    def energy(z: torch.Tensor) -> torch.Tensor:
        _split(z)
        sq = ((z.unsqueeze(-2) - mu.to(z)) ** 2).sum(-1)
        return -torch.logsumexp(-0.5 * sq / (std * std), dim=-1)

    return Target(name, energy, box, log_z, True, f"{mu.shape[0]} Gaussians, std {std}")


def banana_target(
    std1: float = 1.0,
    std2: float = 0.5,
    bend: float = 0.4,
    shift: float = 2.0,
    name: str = "banana",
    box: Box = DEFAULT_BOX,
) -> Target:
    """Twisted Gaussian: z1 ~ N(0, s1²), z2 | z1 ~ N(b z1² − c, s2²).

    U(z) = z1² / (2 s1²) + (z2 − b z1² + c)² / (2 s2²).  The shear (z1, z2) ↦ (z1, z2 − b z1²)
    has unit Jacobian, so Z = 2π s1 s2.
    """

    def energy(z: torch.Tensor) -> torch.Tensor:
        z1, z2 = _split(z)
        return 0.5 * (z1 / std1) ** 2 + 0.5 * ((z2 - bend * z1**2 + shift) / std2) ** 2

    log_z = math.log(2.0 * math.pi * std1 * std2)
    return Target(name, energy, box, log_z, True, f"banana, z2 | z1 ~ N({bend} z1² − {shift}, {std2}²)")


def ring_target(radius: float = 2.5, std: float = 0.3, name: str = "ring", box: Box = DEFAULT_BOX) -> Target:
    """U(z) = ½ ((‖z‖ − r) / s)².

    In polar coordinates Z = 2π ∫₀^∞ ρ exp(−(ρ − r)² / (2s²)) dρ
    = 2π (s² exp(−r² / (2s²)) + r s √(2π) Φ(r / s)), Φ the standard normal CDF.
    """

    def energy(z: torch.Tensor) -> torch.Tensor:
        _split(z)
        return 0.5 * ((torch.linalg.vector_norm(z, dim=-1) - radius) / std) ** 2

    phi = 0.5 * math.erfc(-radius / (std * math.sqrt(2.0)))
    z_value = (
        2.0
        * math.pi
        * (std * std * math.exp(-0.5 * (radius / std) ** 2) + radius * std * math.sqrt(2.0 * math.pi) * phi)
    )
    return Target(name, energy, box, math.log(z_value), True, f"ring, radius {radius}, width {std}")


def confine_z1(energy: Energy, low: float = -4.0, high: float = 4.0, width: float = 0.2) -> Energy:
    """U(z) + ½ (d / width)², d the distance of z1 outside [low, high]: exactly U inside the window.

    The wall makes the sine-wave energies U2–U4 integrable: outside the window their density
    falls like a half-Gaussian of standard deviation ``width`` (about 6 % of the mass for the defaults).
    """

    def confined(z: torch.Tensor) -> torch.Tensor:
        z1, _ = _split(z)
        outside = torch.relu(low - z1) + torch.relu(z1 - high)
        return energy(z) + 0.5 * (outside / width) ** 2

    confined.__name__ = f"{getattr(energy, '__name__', 'energy')}_confined"
    confined.__doc__ = (
        f"{getattr(energy, '__name__', 'U')} inside {low} <= z1 <= {high}, with a soft wall of width {width} outside."
    )
    return confined


# The U4 branch z2 = w1 − w3 dips to −4 near z1 = 3, and the wall adds mass past |z1| = 4.
SINE_QUADRATURE_BOX: Box = (-5.5, 5.5, -6.0, 5.0)


def _eight_modes(radius: float) -> list[list[float]]:
    return [[radius * math.cos(2.0 * math.pi * k / 8), radius * math.sin(2.0 * math.pi * k / 8)] for k in range(8)]


TARGETS: dict[str, Target] = {
    "u1": Target("u1", u1, DEFAULT_BOX, None, True, "U1: ring with two lobes (Rezende & Mohamed 2015)"),
    "u2": Target(
        "u2", confine_z1(u2), DEFAULT_BOX, None, True, "U2: sine wave, |z1| <= 4 (soft wall)", SINE_QUADRATURE_BOX
    ),
    "u3": Target(
        "u3",
        confine_z1(u3),
        DEFAULT_BOX,
        None,
        True,
        "U3: sine wave split by w2, |z1| <= 4 (soft wall)",
        SINE_QUADRATURE_BOX,
    ),
    "u4": Target(
        "u4",
        confine_z1(u4),
        DEFAULT_BOX,
        None,
        True,
        "U4: sine wave split by w3, |z1| <= 4 (soft wall)",
        SINE_QUADRATURE_BOX,
    ),
    "mog2": mixture_target([[-2.0, 0.0], [2.0, 0.0]], 0.5, "mog2"),
    "mog8": mixture_target(_eight_modes(2.5), 0.3, "mog8"),
    "banana": banana_target(),
    "ring": ring_target(),
    "gaussian": gaussian_target([1.0, -0.5], [[0.5, 0.3], [0.3, 0.6]]),
}


def get_target(name: str) -> Target:
    """Look up a target by name with a one-line error listing the choices."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}") from None
