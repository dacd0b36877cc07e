"""The ``flowvae`` command: its parser (every subcommand group registers itself) and :func:`main`,
which turns every expected failure into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import signal
import sys
from pathlib import Path

from flowvae.cli import report_commands, run_commands
from flowvae.config import ConfigError
from flowvae.data import DataError
from flowvae.evaluation import reuse_freed_memory
from flowvae.interrupts import Terminated, handled_interrupts
from flowvae.toy import cli as toy_cli
from flowvae.training import CheckpointError, RunDirError

logger = logging.getLogger("flowvae")

EXAMPLES = """examples:
  flowvae train --dataset digits --flow iaf --flow-steps 4 --out runs/digits
  flowvae train --dataset binarized_mnist --data-dir ../shared/data --flow iaf --flow-steps 4 --epochs 100 --out runs/iaf4
  flowvae train --config run.yaml --resume
  flowvae evaluate --run runs/iaf4 --samples 5000
  flowvae sample --run runs/iaf4 --n 64 --out samples.png
  flowvae toy --target u1 --flow planar --flow-steps 32 --out runs/u1
  flowvae curves runs/iaf4
  flowvae compare runs/iaf4 runs/planar8 --csv table.csv --plot valid.png
  flowvae posterior --run runs/digits-2d --n 6
"""  # noqa: E501 (help text: each example is a command a user copies whole)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and a "did you mean" for mistyped flags."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unrecognized(self, extra: list[str]) -> None:
        """Exit with one line naming the unknown arguments ``extra`` and the flags they are closest to."""
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        hints = {}
        for token in extra:
            flag = token.split("=")[0]
            close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.6) if flag.startswith("-") else []
            hints |= {flag: close[0]} if close else {}
        hint = ", ".join(f"{good} for {bad}" if len(hints) > 1 else good for bad, good in hints.items())
        self.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {hint}?)" if hints else ""))


def build_parser() -> argparse.ArgumentParser:
    """``flowvae``'s parser with every subcommand: train, evaluate, sample, toy, curves, compare,
    posterior, manifold."""
    parser = Parser(
        prog="flowvae",
        description="VAEs with normalizing-flow posteriors.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = parser.add_subparsers(dest="command", required=True)

    run_commands.add_subcommands(sub)  # train, evaluate, sample

    p = sub.add_parser("toy", help="fit flows to 2-D target densities (Rezende & Mohamed 2015, Fig. 3)")
    toy_cli.add_arguments(p)
    p.set_defaults(func=toy_cli.run)

    report_commands.add_subcommands(sub)  # curves, compare, posterior, manifold
    for subparser in sub.choices.values():  # -v after the subcommand too (flowvae train -v ...)
        subparser.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="log every epoch (and more) to stderr",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``flowvae ARGV`` (default: ``sys.argv[1:]``) and return its exit code: 0, 2 for a mistake
    (one line on stderr), 130 after Ctrl-C and 128 + SIGTERM when terminated."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        subcommands[args.command].unrecognized(extra)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    reuse_freed_memory()
    try:
        with handled_interrupts():
            return args.func(args)
    except (ConfigError, DataError, CheckpointError, RunDirError, FloatingPointError, ValueError) as err:
        return _fail(args, str(err))
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError and the CPU allocator's RuntimeError
        if not isinstance(err, MemoryError) and not re.search(r"out of memory|can't allocate memory", str(err)):
            raise  # a bug: the traceback is wanted
        size = re.search(r"allocate (\d+) bytes", str(err))
        tried = f" (tried to allocate {int(size.group(1)) / 2**30:.1f} GiB)" if size else ""
        return _fail(
            args,
            f"out of memory{tried}: make the model smaller (--hidden, --channels, --latent-dim, "
            "--flow-steps, ...) or lower --batch-size / --eval-batch-size",
        )
    except OSError as err:  # a file-system problem that no earlier check caught
        where = f"{err.filename}: " if err.filename else ""
        return _fail(args, f"{where}{err.strerror or err}")
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        out = getattr(args, "run_out", None)
        if out is not None and (Path(out) / "checkpoint.pt").is_file():
            message = f"{what}; continue with: flowvae train --out {out} --resume"
        elif out is not None:
            message = f"{what} before the first checkpoint; nothing was kept"
        else:
            message = what
        print(f"flowvae {args.command}: {message}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(err, Terminated) else 130


def _fail(args: argparse.Namespace, message: str) -> int:
    """The one line a user sees for a mistake (whitespace, newlines included, collapsed)."""
    print(f"flowvae {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2
