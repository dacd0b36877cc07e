"""The ``flowvae train | evaluate | sample`` subcommands: train a run, score a trained run, draw from it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from flowvae.cli.common import add_run_arguments, check_output_file, check_seed, load_run_from_args
from flowvae.cli.options import add_config_arguments, config_from_args, given_options, no_effect
from flowvae.config import MAX_IMPORTANCE_SAMPLES, ConfigError
from flowvae.evaluation import evaluate
from flowvae.io import atomic_write_text
from flowvae.plots import save_image_grid
from flowvae.runs import run_config
from flowvae.training import interrupted_start, train

TRAIN_DESCRIPTION = """Train a VAE, keep the weights with the best validation -ELBO, then evaluate them: -ELBO on
every split and the test -log p(x) with --eval-samples K importance samples (K = 5000 by default:
the final evaluation can take longer than many epochs; lower K for quick runs).  Every option is
also a key of a --config YAML file; flags override the file.  The run directory --out gets
config.yaml, checkpoint.pt, best.pt, metrics.csv, curves.png, samples.png and results.json."""

MAX_SAMPLES_PER_GRID = 10_000


def cmd_train(args: argparse.Namespace) -> int:
    """``flowvae train``: train and evaluate, then print the results as JSON (worker 0 under torchrun)."""
    config = config_from_args(args)
    out = Path(config.out)
    # Continue with the run's own options (the options given here override them); a start that was
    # interrupted before its first checkpoint is started afresh, with its config.yaml if it has one.
    if args.resume and ((out / "config.yaml").is_file() or not interrupted_start(out)):
        config = config_from_args(args, base=run_config(config.out))
    args.run_out = config.out  # for the message on Ctrl-C
    results = train(config, resume=args.resume, notices=no_effect(config, given_options(args)))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, worker 0 reports
        return 0
    test = results["test"]
    print(
        json.dumps(
            {
                "out": config.out,
                "train_neg_elbo": results["train"]["neg_elbo"],
                "valid_neg_elbo": results["valid"]["neg_elbo"],
                "test_neg_elbo": test["neg_elbo"],
                "test_nll": test["nll"],
                "test_nll_mc_se": test["nll_mc_se"],
                "nll_samples": test["nll_samples"],
            },
            indent=2,
        )
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``flowvae evaluate``: -ELBO and the importance-sampled -log p(x) of a split, as JSON."""
    if args.samples < 0 or args.limit < 0:
        raise ConfigError(f"--samples and --limit must be >= 0, got {args.samples} and {args.limit}")
    if args.samples > MAX_IMPORTANCE_SAMPLES:
        raise ConfigError(
            f"--samples must be at most {MAX_IMPORTANCE_SAMPLES} importance samples per point, got {args.samples}"
        )
    check_seed(args.seed)
    if args.output is not None:
        check_output_file(args.output, "--output")
    run = load_run_from_args(args)
    config = run.config
    split = run.images(args.split, args.data)
    if args.limit:
        split = split[: args.limit]
    results = evaluate(
        run.model,
        split,
        batch_size=config.eval_batch_size,
        samples=args.samples,
        device=run.device,
        progress=sys.stderr.isatty(),
        desc=f"{args.split} -log p(x), K={args.samples}",
        seed=args.seed,
        precision=config.precision,
        compile=config.compile if args.compile is None else args.compile,
    )
    results.update(split=args.split, checkpoint=args.checkpoint, points=len(split))
    if args.data is not None:
        results["data"] = str(args.data)
    print(json.dumps(results, indent=2))
    if args.output is not None:
        atomic_write_text(args.output, json.dumps(results, indent=2))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """``flowvae sample``: one PNG grid of ``--n`` images drawn from the model."""
    if not 1 <= args.n <= MAX_SAMPLES_PER_GRID:
        raise ConfigError(f"--n must be between 1 and {MAX_SAMPLES_PER_GRID}, got {args.n}")
    check_seed(args.seed)
    check_output_file(args.out, "--out", suffix=".png")
    run = load_run_from_args(args)
    generator = torch.Generator(device=run.device).manual_seed(args.seed)
    images = run.model.sample(args.n, generator)
    save_image_grid(images, args.out)
    print(f"wrote {args.n} samples to {args.out}")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register train, evaluate and sample on ``flowvae``'s subparsers."""
    p = sub.add_parser(
        "train",
        help="train a VAE and evaluate it",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.set_defaults(func=cmd_train)

    for name, func, help_text in (
        ("evaluate", cmd_evaluate, "evaluate a trained run"),
        ("sample", cmd_sample, "draw samples from a trained run"),
    ):
        p = sub.add_parser(name, help=help_text)
        add_run_arguments(p, data_dir_help="where the run's registered data set is (evaluate only)")
        p.add_argument("--seed", type=int, default=0, help="seeds the posterior or prior draws (default 0)")
        p.set_defaults(func=func)
        if name == "evaluate":
            p.add_argument(
                "--split",
                choices=("train", "valid", "test"),
                default="test",
                help="which split of the run's data, or of --data when it has splits (default test)",
            )
            p.add_argument(
                "--data",
                default=None,
                metavar="PATH",
                help="score these images (folder, .npy, .npz, or a registered data set's name) instead "
                "of the run's data set; they must have the run's image shape and data kind",
            )
            p.add_argument("--samples", type=int, default=5000, help="K importance samples (default 5000)")
            p.add_argument("--output", default=None, help="also write the results as JSON here")
            p.add_argument("--limit", type=int, default=0, help="evaluate only the first N points of the split")
            p.add_argument(
                "--compile",
                action=argparse.BooleanOptionalAction,
                default=None,
                help="torch.compile the importance sampling (default: as the run was trained)",
            )
        else:
            p.add_argument("--n", type=int, default=64, help="how many samples, drawn as one grid (default 64)")
            p.add_argument("--out", default="samples.png", help="PNG to write (default samples.png)")
