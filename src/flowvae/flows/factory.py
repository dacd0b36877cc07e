"""Build a stack of posterior flows by name, as the CLI and the VAE configs do."""

from __future__ import annotations

from flowvae.flows.autoregressive import IAF, MAF
from flowvae.flows.base import Compose, Flow
from flowvae.flows.elementwise import Householder, Planar, Radial
from flowvae.flows.glow import AffineCoupling
from flowvae.flows.sylvester import HouseholderSylvester, OrthogonalSylvester, TriangularSylvester

FLOW_NAMES = ("none", "planar", "radial", "householder", "sylvester-orthogonal", "sylvester-householder",
              "sylvester-triangular", "iaf", "maf", "coupling")


def build_flow(name: str, dim: int, steps: int, context_dim: int | None = None, hidden: int = 320,
               reflections: int = 8, rank: int | None = None) -> Flow | None:
    """A ``Compose`` of ``steps`` flows of one family over ``dim`` latents, or None for 'none'.

    Planar, radial, Householder and Sylvester steps are amortized (their parameters come from h);
    IAF, MAF and coupling steps have global weights and read h as an extra input.  Autoregressive
    orderings and coupling halves alternate between steps.
    """
    if name not in FLOW_NAMES:
        raise ValueError(f"unknown flow {name!r}; choose one of {', '.join(FLOW_NAMES)}")
    if name == "none" or steps == 0:
        return None
    if steps < 0:
        raise ValueError(f"flow steps must be >= 0, got {steps}")
    order = lambda k: "natural" if k % 2 == 0 else "reversed"  # noqa: E731
    make = {
        "planar": lambda k: Planar(dim, context_dim),
        "radial": lambda k: Radial(dim, context_dim),
        "householder": lambda k: Householder(dim, 1, context_dim),
        "sylvester-orthogonal": lambda k: OrthogonalSylvester(dim, rank, context_dim),
        "sylvester-householder": lambda k: HouseholderSylvester(dim, reflections, context_dim),
        "sylvester-triangular": lambda k: TriangularSylvester(dim, k % 2 == 1, context_dim),
        "iaf": lambda k: IAF(dim, (hidden, hidden), context_dim, order(k)),
        "maf": lambda k: MAF(dim, (hidden, hidden), context_dim, order(k)),
        "coupling": lambda k: AffineCoupling(dim, hidden, context_dim, event_dim=1, swap=k % 2 == 1),
    }[name]
    return Compose([make(k) for k in range(steps)])
