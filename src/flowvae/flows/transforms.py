"""Moved to :mod:`flowvae.flows.interop` (the bridges to torch.distributions, Pyro and zuko); this alias
keeps ``flowvae.flows.transforms`` importable."""

from flowvae.flows.interop import FlowTransform, IdentityCache, TransformFlow, as_transform, from_transform

__all__ = ["FlowTransform", "TransformFlow", "as_transform", "from_transform", "IdentityCache"]
