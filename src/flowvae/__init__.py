"""flowvae: variational inference with normalizing flows."""

from flowvae.parallelism import apply_thread_defaults

apply_thread_defaults()  # before torch is loaded: see flowvae.parallelism

__version__ = "0.1.0"
