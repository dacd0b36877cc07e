"""Normalizing flows with exact log-determinants; see :mod:`flowvae.flows.base` for the contract."""

from flowvae.flows.autoregressive import IAF, MAF
from flowvae.flows.base import Compose, Flow, FlowParameters, Inverse
from flowvae.flows.elementwise import Householder, Planar, Radial
from flowvae.flows.factory import FLOW_NAMES, FLOWS, IMAGE_FLOW_NAMES, IMAGE_FLOWS, build_flow, build_image_flow
from flowvae.flows.glow import ActNorm, AffineCoupling, InvertibleConv1x1, Permute, Reverse, SpatialContextCoupling
from flowvae.flows.interop import FlowTransform, TransformFlow, as_transform, from_transform
from flowvae.flows.made import MADE, BernoulliMADE, MaskedLinear
from flowvae.flows.sylvester import HouseholderSylvester, OrthogonalSylvester, TriangularSylvester

__all__ = [
    "Flow",
    "Compose",
    "Inverse",
    "FlowParameters",
    "build_flow",
    "FLOW_NAMES",
    "FLOWS",
    "build_image_flow",
    "IMAGE_FLOW_NAMES",
    "IMAGE_FLOWS",
    "Planar",
    "Radial",
    "Householder",
    "OrthogonalSylvester",
    "HouseholderSylvester",
    "TriangularSylvester",
    "MADE",
    "BernoulliMADE",
    "MaskedLinear",
    "IAF",
    "MAF",
    "ActNorm",
    "InvertibleConv1x1",
    "AffineCoupling",
    "SpatialContextCoupling",
    "Permute",
    "Reverse",
    "as_transform",
    "from_transform",
    "FlowTransform",
    "TransformFlow",
]
