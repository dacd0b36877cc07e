"""The ``flowvae`` command line (``flowvae = "flowvae.cli:main"``), one module per job:

- :mod:`~flowvae.cli.app`: the parser and :func:`main` (one-line errors and exit codes);
- :mod:`~flowvae.cli.run_commands`: ``train``, ``evaluate``, ``sample``;
- :mod:`~flowvae.cli.report_commands`: ``curves``, ``compare``, ``posterior``, ``manifold``
  (``toy`` is :mod:`flowvae.toy.cli`);
- :mod:`~flowvae.cli.common`: the checks and run arguments the subcommands share;
- :mod:`~flowvae.cli.options` and :mod:`~flowvae.cli.option_help`: one flag per config field, and its help;
- :mod:`~flowvae.cli.docs`: ``docs/cli.md`` written from the parser.

Imports point one way: ``app`` → the subcommand modules → ``common`` and ``options`` → the library.
"""

from __future__ import annotations

from flowvae.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
