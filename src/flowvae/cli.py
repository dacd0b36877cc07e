"""The ``flowvae`` command: train, evaluate, sample, toy."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from flowvae.config import ConfigError, TrainConfig, add_config_arguments, config_from_args, load_yaml

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


def _run_config(run: str) -> TrainConfig:
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run} is not a flowvae run directory (no config.yaml)")
    return TrainConfig.from_dict(load_yaml(path), source=str(path))


def _load_run(args: argparse.Namespace):
    """The trained model of a run directory, its config and data."""
    from flowvae.training import load_checkpoint, load_weights, model_from_config, prepare_data, resolve_device

    config = _run_config(args.run)
    if args.data_dir:
        config.data_dir = args.data_dir
    device = resolve_device(args.device or config.device)
    path = Path(args.run) / f"{args.checkpoint}.pt"
    checkpoint = load_checkpoint(path, config)
    data = prepare_data(config)
    model = model_from_config(config, data.splits.image_shape, data.splits.kind)
    load_weights(model, checkpoint["model"], path)
    return config, data, model.to(device).eval(), device


def _check_writable_file(path: str, flag: str) -> None:
    """Before any long work: ``path`` can be written as a file."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is not a directory")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"{flag} {path}: cannot create {parent}: {err.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: {parent} is not writable")


def cmd_train(args: argparse.Namespace) -> int:
    from flowvae.training import train

    config = config_from_args(args)
    if args.resume:  # continue with the run's own options; the options given here override them
        config = config_from_args(args, base=_run_config(config.out))
    results = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, worker 0 reports
        return 0
    test = results["test"]
    print(json.dumps({"out": config.out, "train_neg_elbo": results["train"]["neg_elbo"],
                      "valid_neg_elbo": results["valid"]["neg_elbo"], "test_neg_elbo": test["neg_elbo"],
                      "test_nll": test["nll"], "nll_samples": test["nll_samples"]}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flowvae.evaluation import evaluate

    if args.samples < 0 or args.limit < 0:
        raise ConfigError(f"--samples and --limit must be >= 0, got {args.samples} and {args.limit}")
    if args.output:
        _check_writable_file(args.output, "--output")
    config, data, model, device = _load_run(args)
    split = {"train": data.train_eval, "valid": data.valid, "test": data.test}[args.split]
    if args.limit:
        split = split[:args.limit]
    results = evaluate(model, split, batch_size=config.eval_batch_size, samples=args.samples, device=device,
                       progress=True, desc=f"{args.split} -log p(x), K={args.samples}", seed=args.seed,
                       precision=config.precision)
    results.update(split=args.split, checkpoint=args.checkpoint, points=len(split))
    print(json.dumps(results, indent=2))
    if args.output:
        from flowvae.io import atomic_write_text

        atomic_write_text(args.output, json.dumps(results, indent=2))
    return 0


MAX_SAMPLES_PER_GRID = 10_000


def cmd_sample(args: argparse.Namespace) -> int:
    from flowvae.plots import save_image_grid

    if not 1 <= args.n <= MAX_SAMPLES_PER_GRID:
        raise ConfigError(f"--n must be between 1 and {MAX_SAMPLES_PER_GRID}, got {args.n}")
    _check_writable_file(args.out, "--out")
    _, _, model, device = _load_run(args)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = model.sample(args.n, generator)
    save_image_grid(images, args.out)
    print(f"wrote {args.n} samples to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowvae", description="VAEs with normalizing-flow posteriors.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a VAE and evaluate it", description=TrainConfig.__doc__)
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.set_defaults(func=cmd_train)

    for name, func, help_text in (("evaluate", cmd_evaluate, "evaluate a trained run"),
                                  ("sample", cmd_sample, "draw samples from a trained run")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--run", required=True, help="run directory written by flowvae train")
        p.add_argument("--checkpoint", choices=("best", "checkpoint"), default="best")
        p.add_argument("--device", default=None, help="default: the run's device")
        p.add_argument("--data-dir", default=None)
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=func)
        if name == "evaluate":
            p.add_argument("--split", choices=("train", "valid", "test"), default="test")
            p.add_argument("--samples", type=int, default=5000, help="K importance samples (default 5000)")
            p.add_argument("--output", default=None, help="also write the results as JSON here")
            p.add_argument("--limit", type=int, default=0, help="evaluate only the first N points of the split")
        else:
            p.add_argument("--n", type=int, default=64)
            p.add_argument("--out", default="samples.png")

    from flowvae.toy import cli as toy_cli

    p = sub.add_parser("toy", help="fit flows to 2-D target densities (Rezende & Mohamed 2015, Fig. 3)")
    toy_cli.add_arguments(p)
    p.set_defaults(func=toy_cli.run)

    from flowvae import cli_report

    cli_report.add_subcommands(sub)  # curves, compare, posterior, manifold
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from flowvae.data import DataError
    from flowvae.training import CheckpointError, RunDirError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, RunDirError, FloatingPointError, ValueError) as err:
        print(f"flowvae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
