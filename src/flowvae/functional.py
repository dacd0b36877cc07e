"""Moved to :mod:`flowvae.flows.functional` (the stateless flow maths); this alias keeps
``flowvae.functional`` importable."""

from flowvae.flows.functional import (householder, householder_matrix, orthonormal_columns, planar, planar_chain,
                                      planar_constraint, radial, radial_inverse, sylvester)

__all__ = ["planar", "planar_constraint", "planar_chain", "radial", "radial_inverse", "householder",
           "householder_matrix", "orthonormal_columns", "sylvester"]
