"""Posterior families on statically binarized MNIST (and Frey Faces), beside van den Berg et al. 2018.

Trains one VAE per posterior family — no flow, planar, radial, Householder, IAF and the three
Sylvester flows (O-SNF, H-SNF, T-SNF) — with the same encoder, decoder and training budget, then
reports the test negative ELBO and the importance-weighted −log p(x) in one Markdown table, next to
the published figures of van den Berg et al. (2018, Table 1): published −ELBO beside our −ELBO,
published −log p(x) beside our −log p(x), never one beside the other.  A second table has the layout
of an often-cited blog comparison of MNIST-VAE and MNIST-VAE+IAF (training loss, validation loss,
test −log p(x|z)), which is not comparable one-to-one with the paper's table.

Budgets (``--budget``; each one is spelled out in the header of the table it writes):

- ``smoke``: seconds.  The 8x8 digits (for ``--dataset binarized_mnist``) or Frey Faces, a tiny
  MLP VAE, one epoch, K = 10.  Checks the script end to end; not saved unless ``--save``.
- ``cpu-30min``: the whole table in about 30 minutes on a 2-core CPU, evaluation included.  A
  small MLP VAE (784-300-300, 40 latents, 4 flow steps), the same number of epochs for every
  family with a per-model cap on training minutes, one seed, and −log p(x) on a fixed subset of
  the test set (the first N test images).
- ``full``: the paper's setup: gated-convolution encoder and decoder, z = 64, batch 100, Adam
  5e-4, KL warm-up over 100 epochs, at most 2000 epochs with early stopping after 100 epochs
  without improvement of the validation −ELBO, K = 5000 on the whole test set, three seeds.
  Meant for a GPU (``--device cuda``): days of compute.

Every run lives in ``<out-dir>/<budget>/<dataset>/<family>/seed<k>``: a finished run (its
``results.json`` exists) is read back, an interrupted one is resumed from its checkpoint, so the
command can be killed and started again.

    python benchmarks/mnist_table.py --budget smoke                          # < 1 min, not saved
    python benchmarks/mnist_table.py --budget smoke --dataset freyfaces
    python benchmarks/mnist_table.py --budget cpu-30min --threads 2          # ~30 min on 2 cores
    python benchmarks/mnist_table.py --budget cpu-30min --dataset freyfaces --threads 2
    python benchmarks/mnist_table.py --budget full --device cuda             # GPU, days
    python benchmarks/mnist_table.py --budget full --device cuda --families none iaf --seeds 0

Writes ``benchmarks/results/mnist_table_<budget>.{md,json}`` (``freyfaces_table_<budget>.*`` for
Frey Faces).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowvae.config import TrainConfig
from flowvae.evaluation import evaluate
from flowvae.runs import load_run
from flowvae.runs import run_config as saved_run_config
from flowvae.training import resolve_device, train

from common import OtherLoad, machine, machine_line, markdown_table, save, set_threads, warn_if_busy

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = next(
    (d / "data" for d in (ROOT / "shared", ROOT.parent / "shared") if (d / "data").is_dir()),
    ROOT.parent / "shared" / "data",
)

FAMILIES = (
    "none",
    "planar",
    "radial",
    "householder",
    "iaf",
    "sylvester-orthogonal",
    "sylvester-householder",
    "sylvester-triangular",
)
LABELS = {
    "none": "no flow",
    "planar": "planar",
    "radial": "radial",
    "householder": "Householder",
    "iaf": "IAF",
    "sylvester-orthogonal": "O-SNF",
    "sylvester-householder": "H-SNF",
    "sylvester-triangular": "T-SNF",
}

# van den Berg et al. 2018, as /work/shared/REFERENCES.md gives them.  The NLLs could not be checked
# against the paper (REFERENCES.md marks them unverified), nor the Frey Faces unit.
PUBLISHED = {
    "binarized_mnist": {
        "neg_elbo": {
            "none": "86.55 ± 0.06",
            "planar": "86.06 ± 0.31",
            "iaf": "84.20 ± 0.17",
            "sylvester-orthogonal": "83.32",
            "sylvester-householder": "83.40",
            "sylvester-triangular": "83.40",
        },
        "nll": {
            "none": "≈ 82.14 †",
            "planar": "≈ 81.91 †",
            "iaf": "≈ 80.79 †",
            "sylvester-orthogonal": "≈ 80.22 †",
            "sylvester-householder": "≈ 80.29 †",
            "sylvester-triangular": "≈ 80.28 †",
        },
    },
    "freyfaces": {
        "neg_elbo": {
            "none": "4.53 ‡",
            "planar": "4.40 ‡",
            "iaf": "4.47 ‡",
            "sylvester-orthogonal": "4.45 ‡ (best SNF)",
            "sylvester-householder": "4.45 ‡ (best SNF)",
            "sylvester-triangular": "4.45 ‡ (best SNF)",
        },
        "nll": {},
    },
}
# The blog's Keras run, as quoted in the issue that asked for this script (not in REFERENCES.md,
# not checked): training loss, validation loss, test -log p(x|z).
BLOG = {"none": ("MNIST-VAE", 70.92, 72.33, 40.19), "iaf": ("MNIST-VAE+IAF", 66.44, 70.89, 39.99)}


@dataclass(frozen=True)
class Budget:
    """One tier: the model, the training protocol and the evaluation, the same for every family."""

    dataset: str
    arch: str
    latent_dim: int
    hidden: int
    flow_steps: int
    flow_hidden: int
    reflections: int
    epochs: int
    warmup_epochs: float
    patience: int
    max_minutes: float | None
    nll_samples: int  # K
    nll_subset: int | None  # the first N test images; None: the whole test set
    seeds: tuple[int, ...]
    families: tuple[str, ...]
    lr: float = 5e-4
    batch_size: int = 100

    def describe(self) -> str:
        model = (
            f"{self.arch} encoder/decoder"
            + (f" (hidden {self.hidden}×2)" if self.arch == "mlp" else "")
            + f", z = {self.latent_dim}, {self.flow_steps} flow steps (MADE width {self.flow_hidden}, "
            f"{self.reflections} reflections per H-SNF step, O-SNF full rank M = z)"
        )
        stop = f"at most {self.epochs} epoch{'s' if self.epochs > 1 else ''}"
        if self.patience:
            stop += f", early stopping after {self.patience} epochs without a better validation −ELBO"
        cap = f", training capped at {self.max_minutes:g} min per model" if self.max_minutes else ""
        subset = "the whole test set" if self.nll_subset is None else f"the first {self.nll_subset} test images"
        warmup = (
            f"KL warm-up over {self.warmup_epochs:g} epoch{'s' if self.warmup_epochs != 1 else ''}"
            if self.warmup_epochs
            else "no KL warm-up"
        )
        return (
            f"{self.dataset}; {model}; batch {self.batch_size}, Adam with lr {self.lr:g}, {warmup}, "
            f"{stop}{cap}; the best-validation weights are evaluated; −ELBO "
            f"(one posterior sample per image) on the whole test set, −log p(x) with K = {self.nll_samples} "
            f"importance samples on {subset}; seeds {', '.join(map(str, self.seeds))}"
        )


_CPU_MNIST = Budget(
    "binarized_mnist",
    "mlp",
    40,
    300,
    4,
    320,
    8,
    epochs=5,
    warmup_epochs=1,
    patience=0,
    max_minutes=6.0,
    nll_samples=5000,
    nll_subset=300,
    seeds=(0,),
    families=FAMILIES,
)
_FULL_MNIST = Budget(
    "binarized_mnist",
    "gated",
    64,
    300,
    4,
    320,
    8,
    epochs=2000,
    warmup_epochs=100,
    patience=100,
    max_minutes=None,
    nll_samples=5000,
    nll_subset=None,
    seeds=(0, 1, 2),
    families=FAMILIES,
)
BUDGETS: dict[tuple[str, str], Budget] = {
    ("smoke", "binarized_mnist"): Budget(
        "digits",
        "mlp",
        8,
        64,
        2,
        32,
        2,
        epochs=1,
        warmup_epochs=0,
        patience=0,
        max_minutes=None,
        nll_samples=10,
        nll_subset=None,
        seeds=(0,),
        families=("none", "planar", "iaf", "sylvester-orthogonal"),
    ),
    ("smoke", "freyfaces"): Budget(
        "freyfaces",
        "mlp",
        8,
        64,
        2,
        32,
        2,
        epochs=1,
        warmup_epochs=0,
        patience=0,
        max_minutes=None,
        nll_samples=10,
        nll_subset=10,
        seeds=(0,),
        families=("none", "iaf"),
    ),
    ("cpu-30min", "binarized_mnist"): _CPU_MNIST,
    # Frey Faces' 256-way decoder has 560·256 outputs per image: an epoch (16 steps) costs ~13 CPU-s
    # and K = 5000 ~10 s per image, so more epochs and a smaller K on fewer images.
    ("cpu-30min", "freyfaces"): dataclasses.replace(
        _CPU_MNIST, dataset="freyfaces", epochs=10, warmup_epochs=2, max_minutes=3.0, nll_samples=1000, nll_subset=25
    ),
    ("full", "binarized_mnist"): _FULL_MNIST,
    ("full", "freyfaces"): dataclasses.replace(_FULL_MNIST, dataset="freyfaces"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", choices=("smoke", "cpu-30min", "full"), default="cpu-30min")
    p.add_argument("--dataset", choices=("binarized_mnist", "freyfaces"), default="binarized_mnist")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=None, help="default: the budget's families")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the budget's seeds")
    p.add_argument("--epochs", type=int, default=None, help="override the budget's epochs")
    p.add_argument("--max-minutes", type=float, default=None, help="override the budget's cap on training minutes")
    p.add_argument("--nll-samples", type=int, default=None, help="override K")
    p.add_argument("--nll-subset", type=int, default=None, help="override N (first N test images; 0: all)")
    p.add_argument("--out-dir", default="runs/mnist_table", help="run directories go under here")
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all visible cores)")
    p.add_argument("--save", action="store_true", help="save a smoke run's tables too")
    return p.parse_args(argv)


def budget_from_args(args: argparse.Namespace) -> Budget:
    budget = BUDGETS[args.budget, args.dataset]
    overrides: dict[str, Any] = {}
    if args.families:
        overrides["families"] = tuple(args.families)
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.max_minutes:
        overrides["max_minutes"] = args.max_minutes
    if args.nll_samples:
        overrides["nll_samples"] = args.nll_samples
    if args.nll_subset is not None:
        overrides["nll_subset"] = args.nll_subset or None
    return dataclasses.replace(budget, **overrides)


def run_config(budget: Budget, family: str, seed: int, args: argparse.Namespace, threads: int) -> TrainConfig:
    """The training run of one family and seed.  With a test subset, train() evaluates K = 1 only
    (a cheap −log p(x) we do not report) and :func:`subset_nll` does the K-sample estimate."""
    return TrainConfig.from_dict(
        dict(
            dataset=budget.dataset,
            data_dir=args.data_dir,
            arch=budget.arch,
            latent_dim=budget.latent_dim,
            hidden=budget.hidden,
            flow=family,
            flow_steps=budget.flow_steps,
            flow_hidden=budget.flow_hidden,
            reflections=budget.reflections,
            epochs=budget.epochs,
            batch_size=budget.batch_size,
            lr=budget.lr,
            warmup_epochs=budget.warmup_epochs,
            patience=budget.patience,
            max_minutes=budget.max_minutes,
            eval_samples=budget.nll_samples if budget.nll_subset is None else 1,
            seed=seed,
            threads=threads,
            device=args.device,
            progress=False,
            out=str(Path(args.out_dir) / args.budget / budget.dataset / family / f"seed{seed}"),
        )
    )


# Fields that may differ between a saved run and this invocation without changing the result.
_FREE_FIELDS = {"data_dir", "threads", "device", "progress", "out"}


def train_or_resume(cfg: TrainConfig) -> dict[str, Any]:
    """results.json of a finished run; otherwise train, resuming from a checkpoint if there is one."""
    out = Path(cfg.out)
    if (out / "config.yaml").exists():
        old = saved_run_config(out).flat()
        diffs = [k for k, v in cfg.flat().items() if k not in _FREE_FIELDS and old.get(k) != v]
        if diffs:
            raise RuntimeError(
                f"{out} holds a run with other settings ({', '.join(diffs)}); remove it or choose another --out-dir"
            )
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    return train(cfg, resume=(out / "checkpoint.pt").exists())


def subset_nll(cfg: TrainConfig, n: int, samples: int, device: torch.device) -> dict[str, Any]:
    """−ELBO and −log p(x) (K = ``samples``) of the best weights on the first ``n`` test images; cached."""
    path = Path(cfg.out) / f"test_first{n}_K{samples}.json"
    if path.exists():
        return json.loads(path.read_text())
    run = load_run(cfg.out, "best", device, data_dir=cfg.data_dir)
    test = run.images("test")
    start = time.perf_counter()
    result = evaluate(
        run.model, test[:n], batch_size=cfg.eval_batch_size, samples=samples, device=device, seed=cfg.seed
    )  # bits/dim for 8-bit data as everywhere else
    result |= {"images": min(n, len(test)), "eval_minutes": round((time.perf_counter() - start) / 60, 3)}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def one_run(budget: Budget, family: str, seed: int, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    cfg = run_config(budget, family, seed, args, threads)
    start = time.perf_counter()
    results = train_or_resume(cfg)
    test = results["test"]
    if budget.nll_subset is not None:
        test = subset_nll(cfg, budget.nll_subset, budget.nll_samples, resolve_device(args.device))
    eight_bit = "bits_per_dim" in results["test"]
    row = {
        "family": family,
        "seed": seed,
        "out": cfg.out,
        "parameters": results["parameters"],
        "epochs_trained": results["epochs_trained"],
        "best_epoch": results["best_epoch"],
        "train_minutes": results["train_minutes"],
        "minutes_this_invocation": round((time.perf_counter() - start) / 60, 3),
        "train_neg_elbo": results["train"]["neg_elbo"],
        "valid_neg_elbo": results["valid"]["neg_elbo"],
        "test_neg_elbo": results["test"]["neg_elbo"],
        "test_reconstruction": results["test"]["reconstruction"],
        "test_kl": results["test"]["kl"],
        "nll": test["nll"],
        "nll_samples": test["nll_samples"],
        "nll_images": test.get("images", "all"),
        "nll_subset_neg_elbo": test["neg_elbo"],
    }
    if eight_bit:
        row |= {"test_neg_elbo_bpd": results["test"]["neg_elbo_bits_per_dim"], "nll_bpd": test["bits_per_dim"]}
    return row


def summary(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def render(payload: dict[str, Any]) -> str:
    budget = Budget(
        **{
            **payload["budget"],
            "seeds": tuple(payload["budget"]["seeds"]),
            "families": tuple(payload["budget"]["families"]),
        }
    )
    rows, eight_bit = payload["runs"], budget.dataset == "freyfaces"
    unit, digits = ("bits/dim", 3) if eight_bit else ("nats", 2)
    elbo_key, nll_key = ("test_neg_elbo_bpd", "nll_bpd") if eight_bit else ("test_neg_elbo", "nll")
    published = PUBLISHED.get(budget.dataset, {"neg_elbo": {}, "nll": {}})
    has_published = budget.dataset in PUBLISHED
    subset = "all test images" if budget.nll_subset is None else f"test images 0–{budget.nll_subset - 1}"
    n_seeds = len(budget.seeds)
    spread = "mean ± sample std over seeds" if n_seeds > 1 else "one seed"
    header = [
        "family",
        f"ours −ELBO ({unit}, {spread})",
        f"published −ELBO ({unit})",
        f"ours −log p(x) ({unit}, K = {budget.nll_samples}, {subset})",
        f"published −log p(x) ({unit})",
        "epochs",
        "train min",
    ]
    table = []
    for family in budget.families:
        done = [r for r in rows if r["family"] == family and "error" not in r]
        name = LABELS[family] + (f" ×{budget.flow_steps}" if family != "none" else "")
        if not done:
            table.append(
                [
                    name,
                    "failed",
                    published["neg_elbo"].get(family, "—"),
                    "failed",
                    published["nll"].get(family, "—"),
                    "—",
                    "—",
                ]
            )
            continue
        table.append(
            [
                name,
                summary([r[elbo_key] for r in done], digits),
                published["neg_elbo"].get(family, "—"),
                summary([r[nll_key] for r in done], digits),
                published["nll"].get(family, "—"),
                "/".join(str(r["epochs_trained"]) for r in done),
                f"{statistics.mean(r['train_minutes'] for r in done):.1f}",
            ]
        )
    lines = [
        f"# Posterior families on {budget.dataset}: budget `{payload['budget_name']}`",
        "",
        f"- Machine: {machine_line(payload['machine'])}",
        f"- Command: `{payload['command']}`",
        f"- Budget: {budget.describe()}",
        f"- Date: {payload['machine']['date']}; wall time of this invocation {payload['wall_minutes']:.1f} min",
        "",
        markdown_table(header, table),
        "",
    ]
    if not has_published:
        lines += [f"No published figures for {budget.dataset} (smoke data): the table shows the layout only."]
    elif eight_bit:
        lines += [
            "Published: van den Berg et al. 2018 (−ELBO per dimension; no −log p(x) listed in our references). "
            "‡ The unit (bits/dim) comes from a reprint and is unverified. Our bits/dim are nats / (560 ln 2) "
            "under the 256-way categorical likelihood. Frey Faces' split (1565/200/200) is a seeded shuffle, "
            "so each seed has its own test set."
        ]
    else:
        lines += [
            "Published: van den Berg et al. 2018, Table 1 (gated conv, z = 64, up to 2000 epochs, 3 seeds). "
            "† Unverified: the −log p(x) figures could not be checked against the paper. "
            "An −ELBO is set only beside an −ELBO and a −log p(x) only beside a −log p(x)."
        ]
    if budget.nll_subset is not None:
        lines += [
            "",
            f"−ELBO is over the whole test set, −log p(x) over its first {budget.nll_subset} images, "
            "so their difference is not the ELBO gap; "
            "the JSON also holds the −ELBO of that subset (`nll_subset_neg_elbo`).",
        ]
    if has_published and payload["budget_name"] != "full":
        lines += [
            "",
            "The published figures come from the `full` protocol, not from this budget's smaller model "
            "and shorter training: they show where the families should end up, not what this budget can reach.",
        ]
    blog = [r for r in rows if r["family"] in BLOG and "error" not in r]
    if not eight_bit and blog:
        lines += [
            "",
            "## In the layout of the blog comparison (MNIST-VAE vs MNIST-VAE+IAF)",
            "",
            markdown_table(
                ["model", "training loss", "validation loss", "test −log p(x\\|z)"],
                [[f"blog: {BLOG[f][0]} (Keras, as quoted in the issue; not checked)", *BLOG[f][1:]] for f in BLOG]
                + [
                    [
                        f"ours: {LABELS[f]}" + (f" ×{budget.flow_steps}" if f != "none" else ""),
                        summary([r["train_neg_elbo"] for r in blog if r["family"] == f], 2),
                        summary([r["valid_neg_elbo"] for r in blog if r["family"] == f], 2),
                        summary([r["test_reconstruction"] for r in blog if r["family"] == f], 2),
                    ]
                    for f in BLOG
                    if any(r["family"] == f for r in blog)
                ],
            ),
            "",
            "Ours: training loss = −ELBO of the training set (fixed binarization, best-validation weights, "
            "β = 1), validation loss = validation −ELBO, test −log p(x|z) = the reconstruction term of the "
            "test −ELBO (one posterior sample), in nats. −log p(x|z) is not −log p(x): these columns are not "
            "comparable one-to-one with the table above, and the blog's data, model and training differ from "
            "ours.",
        ]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(f"{r['family']} seed {r['seed']}: {r['error']}" for r in failed)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = budget_from_args(args)
    threads = set_threads(args.threads)
    warn_if_busy(threads)
    info = machine()
    load = OtherLoad().start()
    start = time.perf_counter()
    rows = []
    for family in budget.families:
        for seed in budget.seeds:
            print(f"{budget.dataset} {family} seed {seed} ...", file=sys.stderr, flush=True)
            try:
                rows.append(one_run(budget, family, seed, args, threads))
            except Exception as err:  # report and go on with the other families
                traceback.print_exc()
                rows.append({"family": family, "seed": seed, "error": f"{type(err).__name__}: {err}"})
    info["other_processes_cores"] = load.stop()
    payload = {
        "budget_name": args.budget,
        "budget": dataclasses.asdict(budget),
        "machine": info,
        "command": "python " + shlex.join(sys.argv if argv is None else ["benchmarks/mnist_table.py", *argv]),
        "wall_minutes": (time.perf_counter() - start) / 60,
        "runs": rows,
    }
    markdown = render(payload)
    print(markdown)
    if args.budget != "smoke" or args.save:
        stem = "freyfaces_table" if args.dataset == "freyfaces" else "mnist_table"
        json_path, md_path = save(f"{stem}_{args.budget}", payload, markdown)
        print(f"\nwrote {json_path} and {md_path}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
