"""The ``flowvae`` command: train, evaluate, sample, toy."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

import torch

from flowvae.config import (MAX_IMPORTANCE_SAMPLES, MAX_SEED, ConfigError, TrainConfig, add_config_arguments,
                            config_from_args, given_options, load_yaml, no_effect)
from flowvae.interrupts import Terminated, handled_interrupts
from flowvae.io import existing_ancestor, probe_writable

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
"""


TRAIN_DESCRIPTION = """Train a VAE, keep the weights with the best validation -ELBO, then evaluate them: -ELBO on
every split and the test -log p(x) with --eval-samples K importance samples (K = 5000 by default:
the final evaluation can take longer than many epochs; lower K for quick runs).  Every option is
also a key of a --config YAML file; flags override the file.  The run directory --out gets
config.yaml, checkpoint.pt, best.pt, metrics.csv, curves.png, samples.png and results.json."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and a "did you mean" for mistyped flags."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unrecognized(self, extra: list[str]) -> None:
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        hints = {}
        for token in extra:
            flag = token.split("=")[0]
            close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.6) if flag.startswith("-") else []
            hints |= {flag: close[0]} if close else {}
        hint = ", ".join(f"{good} for {bad}" if len(hints) > 1 else good for bad, good in hints.items())
        self.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {hint}?)" if hints else ""))


def _run_config(run: str) -> TrainConfig:
    from flowvae.runs import run_config

    return run_config(run)


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")


def _load_run(args: argparse.Namespace):
    """The run directory ``args.run`` loaded for inference (a :class:`flowvae.runs.TrainedRun`):
    its model, config and recorded data shape and kind; no data files are read."""
    from flowvae.runs import load_run

    return load_run(args.run, args.checkpoint, args.device, data_dir=args.data_dir)


def check_output_file(path: str | Path, flag: str, suffix: str | None = None) -> None:
    """Before any long work: ``path`` can be written as a file (nothing is created here)."""
    if not str(path).strip():
        raise ConfigError(f"{flag} must name a file")
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    if target.exists() and not target.is_file():
        raise ConfigError(f"{flag} {path} exists and is not a regular file")
    if suffix and target.suffix.lower() != suffix:
        raise ConfigError(f"{flag} {path}: this file is written as {suffix[1:].upper()}; "
                          f"give a name ending in {suffix}")
    ancestor = existing_ancestor(target)
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: {ancestor} is not a directory")
    try:
        probe_writable(ancestor)
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot write in {ancestor} ({err.strerror})") from None


def cmd_train(args: argparse.Namespace) -> int:
    from flowvae.training import interrupted_start, train

    config = config_from_args(args)
    out = Path(config.out)
    # Continue with the run's own options (the options given here override them); a start that was
    # interrupted before its first checkpoint is started afresh, with its config.yaml if it has one.
    if args.resume and ((out / "config.yaml").is_file() or not interrupted_start(out)):
        config = config_from_args(args, base=_run_config(config.out))
    args.run_out = config.out  # for the message on Ctrl-C
    results = train(config, resume=args.resume, notices=no_effect(config, given_options(args)))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, worker 0 reports
        return 0
    test = results["test"]
    print(json.dumps({"out": config.out, "train_neg_elbo": results["train"]["neg_elbo"],
                      "valid_neg_elbo": results["valid"]["neg_elbo"], "test_neg_elbo": test["neg_elbo"],
                      "test_nll": test["nll"], "test_nll_mc_se": test["nll_mc_se"],
                      "nll_samples": test["nll_samples"]}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flowvae.evaluation import evaluate

    if args.samples < 0 or args.limit < 0:
        raise ConfigError(f"--samples and --limit must be >= 0, got {args.samples} and {args.limit}")
    if args.samples > MAX_IMPORTANCE_SAMPLES:
        raise ConfigError(f"--samples must be at most {MAX_IMPORTANCE_SAMPLES} importance samples per point, "
                          f"got {args.samples}")
    check_seed(args.seed)
    if args.output is not None:
        check_output_file(args.output, "--output")
    run = _load_run(args)
    config = run.config
    split = run.images(args.split, args.data)
    if args.limit:
        split = split[:args.limit]
    results = evaluate(run.model, split, batch_size=config.eval_batch_size, samples=args.samples, device=run.device,
                       progress=sys.stderr.isatty(), desc=f"{args.split} -log p(x), K={args.samples}", seed=args.seed,
                       precision=config.precision, compile=config.compile if args.compile is None else args.compile)
    results.update(split=args.split, checkpoint=args.checkpoint, points=len(split))
    if args.data is not None:
        results["data"] = str(args.data)
    print(json.dumps(results, indent=2))
    if args.output is not None:
        from flowvae.io import atomic_write_text

        atomic_write_text(args.output, json.dumps(results, indent=2))
    return 0


MAX_SAMPLES_PER_GRID = 10_000


def cmd_sample(args: argparse.Namespace) -> int:
    from flowvae.plots import save_image_grid

    if not 1 <= args.n <= MAX_SAMPLES_PER_GRID:
        raise ConfigError(f"--n must be between 1 and {MAX_SAMPLES_PER_GRID}, got {args.n}")
    check_seed(args.seed)
    check_output_file(args.out, "--out", suffix=".png")
    run = _load_run(args)
    generator = torch.Generator(device=run.device).manual_seed(args.seed)
    images = run.model.sample(args.n, generator)
    save_image_grid(images, args.out)
    print(f"wrote {args.n} samples to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flowvae", description="VAEs with normalizing-flow posteriors.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a VAE and evaluate it", description=TRAIN_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.set_defaults(func=cmd_train)

    for name, func, help_text in (("evaluate", cmd_evaluate, "evaluate a trained run"),
                                  ("sample", cmd_sample, "draw samples from a trained run")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--run", required=True, help="run directory written by flowvae train")
        p.add_argument("--checkpoint", choices=("best", "last", "checkpoint"), default="best",
                       help="best.pt (best validation -ELBO) or the last epoch's checkpoint.pt (last or checkpoint)")
        p.add_argument("--device", default=None, help="default: the run's device")
        p.add_argument("--data-dir", default=None, help="where the run's registered data set is (evaluate only)")
        p.add_argument("--seed", type=int, default=0, help="seeds the posterior or prior draws (default 0)")
        p.set_defaults(func=func)
        if name == "evaluate":
            p.add_argument("--split", choices=("train", "valid", "test"), default="test",
                           help="which split of the run's data, or of --data when it has splits (default test)")
            p.add_argument("--data", default=None, metavar="PATH",
                           help="score these images (folder, .npy, .npz, or a registered data set's name) instead "
                                "of the run's data set; they must have the run's image shape and data kind")
            p.add_argument("--samples", type=int, default=5000, help="K importance samples (default 5000)")
            p.add_argument("--output", default=None, help="also write the results as JSON here")
            p.add_argument("--limit", type=int, default=0, help="evaluate only the first N points of the split")
            p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                           help="torch.compile the importance sampling (default: as the run was trained)")
        else:
            p.add_argument("--n", type=int, default=64, help="how many samples, drawn as one grid (default 64)")
            p.add_argument("--out", default="samples.png", help="PNG to write (default samples.png)")

    from flowvae.toy import cli as toy_cli

    p = sub.add_parser("toy", help="fit flows to 2-D target densities (Rezende & Mohamed 2015, Fig. 3)")
    toy_cli.add_arguments(p)
    p.set_defaults(func=toy_cli.run)

    from flowvae import cli_report

    cli_report.add_subcommands(sub)  # curves, compare, posterior, manifold
    for subparser in sub.choices.values():  # -v after the subcommand too (flowvae train -v ...)
        subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                               help="log every epoch (and more) to stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        subcommands[args.command].unrecognized(extra)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from flowvae.data import DataError
    from flowvae.evaluation import reuse_freed_memory
    from flowvae.training import CheckpointError, RunDirError

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
        tried = f" (tried to allocate {int(size.group(1)) / 2 ** 30:.1f} GiB)" if size else ""
        return _fail(args, f"out of memory{tried}: make the model smaller (--hidden, --channels, --latent-dim, "
                           "--flow-steps, ...) or lower --batch-size / --eval-batch-size")
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


if __name__ == "__main__":
    sys.exit(main())
