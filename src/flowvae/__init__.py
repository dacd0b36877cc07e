"""flowvae: variational inference with normalizing flows."""

__version__ = "0.1.0"
