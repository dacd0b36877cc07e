"""What the subcommands share: the checks made before any long work (a seed, an output file) and
the arguments that name a trained run, with the run they load."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowvae.config import MAX_SEED, ConfigError, valid_seed
from flowvae.io import existing_ancestor, probe_writable
from flowvae.runs import TrainedRun, load_run


def check_seed(seed: int) -> None:
    """A ``--seed`` the trainer and the samplers accept, or a one-line :class:`ConfigError`."""
    if not valid_seed(seed):
        raise ConfigError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")


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
        raise ConfigError(
            f"{flag} {path}: this file is written as {suffix[1:].upper()}; give a name ending in {suffix}"
        )
    ancestor = existing_ancestor(target)
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: {ancestor} is not a directory")
    try:
        probe_writable(ancestor)
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot write in {ancestor} ({err.strerror})") from None


def add_run_arguments(
    p: argparse.ArgumentParser, data_dir_help: str = "where the run's registered data set is"
) -> None:
    """``--run``, ``--checkpoint``, ``--device`` and ``--data-dir``: a trained run to load."""
    p.add_argument("--run", required=True, help="run directory written by flowvae train")
    p.add_argument(
        "--checkpoint",
        choices=("best", "last", "checkpoint"),
        default="best",
        help="best.pt (best validation -ELBO) or the last epoch's checkpoint.pt (last or checkpoint)",
    )
    p.add_argument("--device", default=None, help="default: the run's device")
    p.add_argument("--data-dir", default=None, help=data_dir_help)


def load_run_from_args(args: argparse.Namespace) -> TrainedRun:
    """The run that :func:`add_run_arguments`' flags name, loaded for inference by
    :func:`flowvae.load_run`: its model, config and recorded data shape and kind; no data files are read."""
    return load_run(args.run, args.checkpoint, args.device, data_dir=args.data_dir)
