"""Sylvester normalizing flows (van den Berg et al. 2018): orthogonal, Householder and triangular.

f(z) = z + Q R₁ tanh(R₂ Qᵀ z + b); the variants differ only in how Q is built.
R₁, R₂ are upper triangular with diagonals tanh(·) so that r1_mm r2_mm > -1 (invertible).
"""

from __future__ import annotations

import torch

from flowvae.flows import functional as Fn
from flowvae.flows.base import Flow, FlowParameters, constant_init, normal_init


class _Sylvester(Flow):
    unpack: torch.Tensor  # buffers: where the packed triangular entries go, and which are diagonal
    packed_diagonal: torch.Tensor

    def __init__(self, dim: int, rank: int, extra: dict, context_dim: int | None) -> None:
        super().__init__()
        self.dim, self.rank, self.context_dim = dim, rank, context_dim
        # R₁ and R₂ are stored packed: their M(M+1)/2 upper-triangular entries, row by row.  An
        # amortized head then produces only those, half of what full M × M matrices would cost.
        packed = rank * (rank + 1) // 2
        shapes = {
            "r1": ((packed,), normal_init(0.1)),
            "r2": ((packed,), normal_init(0.1)),
            "b": ((rank,), constant_init(0.0)),
            **extra,
        }
        self.params = FlowParameters(shapes, context_dim)
        rows, cols = torch.triu_indices(rank, rank)
        # Unpacking reads one vector [packed entries, tanh(packed diagonal), 0]: strictly upper cells
        # take their packed entry, diagonal cells their tanh, cells below the diagonal the 0.
        unpack = torch.full((rank, rank), packed + rank)
        unpack[rows, cols] = torch.arange(packed)
        unpack[range(rank), range(rank)] = packed + torch.arange(rank)
        self.register_buffer("unpack", unpack.flatten(), persistent=False)
        self.register_buffer("packed_diagonal", torch.nonzero(rows == cols).flatten(), persistent=False)

    def _q(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _triangular(self, packed: torch.Tensor) -> torch.Tensor:
        """(..., M(M+1)/2) -> (..., M, M) upper triangular with diagonal tanh(·) ∈ (-1, 1)."""
        diagonal = torch.tanh(packed.index_select(-1, self.packed_diagonal))
        values = torch.cat([packed, diagonal, packed.new_zeros(()).expand(*packed.shape[:-1], 1)], dim=-1)
        return values.index_select(-1, self.unpack).unflatten(-1, (self.rank, self.rank))

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z, self.dim, context)
        p = self.params(context)
        return Fn.sylvester(z, self._q(p), self._triangular(p["r1"]), self._triangular(p["r2"]), p["b"])


class OrthogonalSylvester(_Sylvester):
    """O-SNF: Q (D × M), M <= D orthonormal columns, from the reduced QR decomposition of a free matrix.

    (van den Berg et al. orthogonalize iteratively; QR gives the same family of Q, exactly orthonormal
    whatever the matrix's conditioning.  It runs in float32 even under 16-bit autocast.)

    Examples:
        >>> import torch
        >>> flow = OrthogonalSylvester(dim=4, rank=2, context_dim=6)
        >>> z, log_abs_det = flow(torch.randn(3, 4), context=torch.randn(3, 6))
        >>> tuple(z.shape), tuple(log_abs_det.shape)
        ((3, 4), (3,))
    """

    def __init__(self, dim: int, rank: int | None = None, context_dim: int | None = None) -> None:
        rank = dim if rank is None else rank
        if not 1 <= rank <= dim:
            raise ValueError(f"OrthogonalSylvester needs 1 <= rank <= dim, got rank={rank}, dim={dim}")
        super().__init__(dim, rank, {"q": ((dim, rank), normal_init(1.0))}, context_dim)

    def _q(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return Fn.orthonormal_columns(p["q"])


class HouseholderSylvester(_Sylvester):
    """H-SNF: Q (D × D) a product of ``reflections`` Householder reflections."""

    def __init__(self, dim: int, reflections: int = 8, context_dim: int | None = None) -> None:
        super().__init__(dim, dim, {"v": ((reflections, dim), normal_init(1.0))}, context_dim)
        self.reflections = reflections

    def _q(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return Fn.householder_matrix(p["v"])


class TriangularSylvester(_Sylvester):
    """T-SNF: Q the identity or the reversal permutation (alternate ``reverse`` between steps)."""

    permutation: torch.Tensor  # a buffer

    def __init__(self, dim: int, reverse: bool = False, context_dim: int | None = None) -> None:
        super().__init__(dim, dim, {}, context_dim)
        eye = torch.eye(dim)
        self.register_buffer("permutation", eye.flip(0) if reverse else eye, persistent=False)

    def _q(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.permutation.to(p["b"].dtype)
