"""flowvae: variational inference with normalizing flows.

``flowvae.fit(...)`` trains on your arrays or files and ``flowvae.load_run(path)`` loads a run
(both in :mod:`flowvae.runs`; imported on first use, so ``import flowvae`` stays light).
"""

from __future__ import annotations

from typing import Any

from flowvae.parallelism import apply_thread_defaults

apply_thread_defaults()  # before torch is loaded: see flowvae.parallelism

__version__ = "0.1.0"
__all__ = ["fit", "load_run", "TrainedRun"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from flowvae import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'flowvae' has no attribute {name!r}")
