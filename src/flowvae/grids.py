"""Regular grids over a 2-D box, shared by the 2-D targets (:mod:`flowvae.toy`) and the posterior
figures (:mod:`flowvae.report`): midpoint-rule quadrature and images of densities."""

from __future__ import annotations

import torch

Box = tuple[float, float, float, float]  # (z1 min, z1 max, z2 min, z2 max)


def grid_points(box: Box, size: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
    """Cell centres of a ``size`` × ``size`` grid over ``box`` and the cell area.

    z has shape (size, size, 2) and is indexed [z2, z1] (row 0 at the lowest z2), as images are.

    >>> grid, area = grid_points((0.0, 1.0, 0.0, 2.0), 2)
    >>> grid[0, 1].tolist(), area
    ([0.75, 0.5], 0.5)
    """
    x0, x1, y0, y1 = box
    hx, hy = (x1 - x0) / size, (y1 - y0) / size
    xs = x0 + hx * (torch.arange(size, dtype=dtype) + 0.5)
    ys = y0 + hy * (torch.arange(size, dtype=dtype) + 0.5)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    return grid, hx * hy
