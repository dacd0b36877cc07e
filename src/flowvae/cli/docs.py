"""The command-line reference (``docs/cli.md``), written from the parser itself:
``python -m flowvae.cli.docs > docs/cli.md``; ``tests/test_site.py`` checks it is current."""

from __future__ import annotations

import argparse
import os

from flowvae.cli.app import build_parser


def markdown() -> str:
    """Every ``flowvae`` subcommand's ``--help``, as one Markdown page."""
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: fix it for a stable page
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = [
        "# Command-line reference",
        "",
        "Generated from the parser by `python -m flowvae.cli.docs > docs/cli.md`; every option of every "
        "subcommand, with its description and default.",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
    ]
    for name, subparser in sub.choices.items():
        parts += ["", f"## flowvae {name}", "", "```text", subparser.format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
