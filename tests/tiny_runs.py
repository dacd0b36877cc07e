"""Settings of the tiny training runs the tests make, shared by the test modules.

Each is a dict of :class:`flowvae.training.TrainConfig` fields; :func:`flags` gives the same
settings as ``flowvae train`` options, so a test can build a config in-process or run the command.

>>> flags({"latent_dim": 2, "progress": False, "compile": True})
['--latent-dim', '2', '--no-progress', '--compile']
"""

from __future__ import annotations

SMALLEST = dict(hidden=8, latent_dim=2, eval_samples=2, epochs=1, progress=False, threads=1)
"""One epoch of the smallest VAE: for runs whose result does not matter, only that they finish."""

DIGITS_MLP = dict(dataset="digits", arch="mlp", hidden=32, latent_dim=4, eval_samples=5, progress=False, threads=1)
"""An MLP VAE without a flow on the 8x8 digits."""

DIGITS_IAF = DIGITS_MLP | dict(flow="iaf", flow_steps=2, flow_hidden=16, eval_samples=20)
"""The MLP VAE with two IAF steps on the 8x8 digits."""


def flags(settings: dict[str, object]) -> list[str]:
    """``flowvae train`` options for TrainConfig fields: ``--name value``, ``--name`` for True,
    ``--no-name`` for False."""
    options: list[str] = []
    for name, value in settings.items():
        option = name.replace("_", "-")
        if isinstance(value, bool):
            options.append(f"--{option}" if value else f"--no-{option}")
        else:
            options += [f"--{option}", str(value)]
    return options
