"""The ``flowvae curves | compare | posterior | manifold`` subcommands (figures in :mod:`flowvae.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowvae import report
from flowvae.cli.common import add_run_arguments, check_output_file, check_seed, load_run_from_args
from flowvae.io import atomic_write_text
from flowvae.runs import run_config

MAX_IMAGES = 64  # posterior: images drawn
MAX_GRID = 1000  # posterior: grid points per axis
MAX_SAMPLES = 100_000  # posterior: q samples for the KL
MAX_AXIS = 100  # manifold: values per latent axis
MAX_DIMS = 64  # manifold: latents traversed


FIGURE_ARCHS = ("mlp", "conv", "gated")  # one vector latent z with posterior(x) and decode(z)


def _check_figure_arch(run: str, arch: str, command: str) -> None:
    """One line for a model whose latent the posterior/manifold figures cannot draw (before loading it)."""
    if arch not in FIGURE_ARCHS:
        why = "its latent is spatial" if arch == "resnet" else "it has several stochastic layers"
        raise ValueError(
            f"{run} is a {arch} model: flowvae {command} draws single-latent models only "
            f"(--arch {', '.join(FIGURE_ARCHS)}), and {why}"
        )


def cmd_curves(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if not run.exists():
        raise ValueError(f"run directory {args.run} does not exist")
    if not run.is_dir():
        raise ValueError(f"{args.run} is not a directory; give a run directory written by flowvae train")
    out = args.out if args.out is not None else run / "curves.png"
    check_output_file(out, "--out", suffix=".png")
    report.plot_curves(run, out, title=f"{args.run}: learning curves")
    print(f"wrote {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    if args.plot is not None:
        check_output_file(args.plot, "--plot", suffix=".png")
    if args.csv is not None:
        check_output_file(args.csv, "--csv")
    comparison = report.compare_runs(args.runs)
    if args.plot is not None:  # read every metrics file before writing anything
        report.plot_comparison(comparison, args.plot)
    print(comparison.markdown())
    if args.csv is not None:
        atomic_write_text(args.csv, comparison.csv())
        print(f"wrote {args.csv}")
    if args.plot is not None:
        print(f"wrote {args.plot}")
    return 0


def cmd_posterior(args: argparse.Namespace) -> int:
    if not (1 <= args.n <= MAX_IMAGES and 8 <= args.grid <= MAX_GRID and 2 <= args.samples <= MAX_SAMPLES):
        raise ValueError(
            f"--n must be in [1, {MAX_IMAGES}], --grid in [8, {MAX_GRID}] and --samples in "
            f"[2, {MAX_SAMPLES}]; got {args.n}, {args.grid} and {args.samples}"
        )
    check_seed(args.seed)
    run_model = run_config(args.run).model
    _check_figure_arch(args.run, run_model.arch, "posterior")
    if run_model.latent_dim != 2:  # before loading data and weights
        raise ValueError(
            f"{args.run} has latent_dim={run_model.latent_dim}; the posterior can be drawn for a 2-D "
            "latent only (flowvae manifold draws latent traversals)"
        )
    out = args.out if args.out is not None else Path(args.run) / "posterior.png"
    check_output_file(out, "--out", suffix=".png")
    run = load_run_from_args(args)
    config, model = run.config, run.model
    split = run.images(args.split, args.data)
    m = config.model
    flow = f"{m.flow}×{m.flow_steps}" if m.flow != "none" and m.flow_steps else "diagonal Gaussian"
    grids = report.plot_posteriors(
        model,
        split[: args.n],
        out,
        grid=args.grid,
        samples=args.samples,
        seed=args.seed,
        title=f"{args.run} (q: {flow}): true posterior p(z|x) and q(z|x), {args.split} images; KL in nats",
    )
    for i, g in enumerate(grids, start=1):
        print(
            f"x{i}: log p(x) = {g.log_px:.3f} (grid)  KL(q‖p(z|x)) = {g.kl:.4f} ± {g.kl_stderr:.4f} "
            f"(MC, {g.samples} samples)"
        )
    print(f"wrote {out}")
    return 0


def cmd_manifold(args: argparse.Namespace) -> int:
    if not (2 <= args.n <= MAX_AXIS and 1 <= args.dims <= MAX_DIMS):
        raise ValueError(f"--n must be in [2, {MAX_AXIS}] and --dims in [1, {MAX_DIMS}]; got {args.n} and {args.dims}")
    _check_figure_arch(args.run, run_config(args.run).model.arch, "manifold")  # before the output check
    out = args.out if args.out is not None else Path(args.run) / "manifold.png"
    check_output_file(out, "--out", suffix=".png")
    model = load_run_from_args(args).model
    report.plot_manifold(
        model,
        out,
        n=args.n,
        dims=args.dims,
        title=f"{args.run}: " + ("decoded z grid" if model.latent_dim == 2 else "latent traversals"),
    )
    print(f"wrote {out}")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register curves, compare, posterior and manifold on ``flowvae``'s subparsers."""
    p = sub.add_parser("curves", help="draw a run's learning curves from its metrics.csv")
    p.add_argument("run", help="run directory written by flowvae train")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/curves.png)")
    p.set_defaults(func=cmd_curves)

    p = sub.add_parser("compare", help="one table of several runs' configurations and results")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write the table (every column) as CSV")
    p.add_argument("--plot", default=None, metavar="PATH", help="draw the runs' valid -ELBO curves to this PNG")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("posterior", help="2-D latent: the true posterior on a grid next to q(z|x), with the KL")
    add_run_arguments(p)
    p.add_argument("--n", type=int, default=6, help="how many images (default 6)")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="draw images from this folder, .npy or .npz instead of the run's data set",
    )
    p.add_argument("--grid", type=int, default=200, help="grid points per axis (default 200)")
    p.add_argument("--samples", type=int, default=2000, help="q samples for the Monte Carlo KL (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/posterior.png)")
    p.set_defaults(func=cmd_posterior)

    p = sub.add_parser("manifold", help="decoded grid of z (2-D latent) or latent traversals")
    add_run_arguments(p)
    p.add_argument("--n", type=int, default=20, help="values per latent axis (default 20)")
    p.add_argument("--dims", type=int, default=8, help="latents to traverse when there are more than 2 (default 8)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/manifold.png)")
    p.set_defaults(func=cmd_manifold)
