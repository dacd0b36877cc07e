"""Importance-weighted −log p(x) against its matrix-product time.

The evaluation's floor is the time of its matrix products.  This script measures that floor two
ways and sets ``flowvae.evaluation.evaluate`` (eager and ``compile=True``) beside it:

- **replay**: every matrix product (``mm``, ``addmm``, ``bmm``) of one evaluation is recorded with
  its operands' shapes and strides (a ``TorchDispatchMode``), then the same products alone are
  timed on tensors of those shapes and layouts: the time that no amount of fusion can remove;
- **peak**: the evaluation's matrix FLOPs (``FlopCounterMode``) at the rate of a square
  ``--matmul``² float32 product, an optimistic bound (skinny products run below that rate).

Default model: the MLP VAE of the CPU tier (784-300-300, ELU, 40 latents, Bernoulli) with IAF×4
on h (MADE 2×320), K = 1000 samples for 100 images; the images are the first test images of
``binarized_mnist.npz`` if ``--data`` points to it, else random bits (times do not depend on them).

    python benchmarks/iw_eval.py                       # about two minutes on 2 cores, compile included
    python benchmarks/iw_eval.py --quick               # smoke run
    python benchmarks/iw_eval.py --points 300 --samples 5000 --repeats 1   # the test protocol's K, 3 batches

Writes ``benchmarks/results/iw_eval.json`` and ``iw_eval.md`` (``--out`` to change the name).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flowvae.evaluation import evaluate, reuse_freed_memory
from flowvae.models import build_vae

import common
from common import machine_line, markdown_table, measure, report, start

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flow", default="iaf", help="posterior flow of the MLP VAE (a flowvae flow name)")
    p.add_argument("--flow-steps", type=int, default=4)
    p.add_argument("--samples", type=int, default=1000, help="K importance samples per image")
    p.add_argument("--points", type=int, default=100, help="images evaluated")
    p.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="images per evaluation batch (flowvae's eval_batch_size; the full test set runs in such batches)",
    )
    p.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist.npz")
    )
    p.add_argument("--chunk", type=int, default=None, help="samples per chunk (default: evaluate's automatic choice)")
    p.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's allocator settings alone (the flowvae command applies reuse_freed_memory)",
    )
    p.add_argument("--matmul", type=int, default=2048, help="size of the square product that sets the peak rate")
    p.add_argument("--repeats", type=int, default=5, help="timed evaluations per variant (median reported)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled evaluation")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all visible cores)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to go quiet",
    )
    p.add_argument(
        "--quick", action="store_true", help="K = 50, one repeat, no compile (results not saved unless --out)"
    )
    p.add_argument("--out", default=None, help="result name under benchmarks/results/ (default iw_eval)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class MatmulRecorder(TorchDispatchMode):
    """Records (op, [(shape, stride) of each tensor operand]) for every matrix product that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, list[tuple[tuple[int, ...], tuple[int, ...]]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.calls.append(
                (func, [(tuple(a.shape), tuple(a.stride())) for a in args if isinstance(a, torch.Tensor)])
            )
        return func(*args, **(kwargs or {}))


def replay(calls: list) -> callable:
    """A function that runs the recorded products again on fresh tensors of the same layouts (one
    tensor per distinct layout: the chunks repeat a few dozen layouts thousands of times)."""
    tensors = {layout: _tensor_like(*layout) for _, layouts in calls for layout in dict.fromkeys(layouts)}
    operands = [(func, [tensors[layout] for layout in layouts]) for func, layouts in calls]

    def run() -> None:
        for func, tensors in operands:
            func(*tensors)

    return run


def product_flops(calls: list) -> int:
    """2·m·k·n per product (times the batch for ``bmm``), from the recorded operand shapes."""
    total = 0
    for func, layouts in calls:
        a, b = (shape for shape, _ in layouts[-2:])
        total += 2 * a[-2] * a[-1] * b[-1] * (a[0] if func is torch.ops.aten.bmm.default else 1)
    return total


def _tensor_like(shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """Random values in a tensor of this shape and stride (transposed views, broadcast biases)."""
    extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if all(shape) else 0
    return torch.randn(extent).as_strided(shape, stride)


def load_images(path: str, points: int, seed: int) -> tuple[torch.Tensor, str]:
    if Path(path).is_file():
        with np.load(path) as data:
            return torch.from_numpy(data["test"][:points].astype(np.float32)).view(-1, 1, 28, 28), f"{path} (test)"
    bits = np.random.default_rng(seed).integers(0, 2, (points, 1, 28, 28)).astype(np.float32)
    return torch.from_numpy(bits), "random bits"


def matmul_rate(n: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / measure(lambda: a @ b, budget_s=2.0, min_repeats=3).median


def run(args: argparse.Namespace) -> dict:
    tuned = False if args.default_allocator else reuse_freed_memory()
    torch.manual_seed(args.seed)
    model = build_vae(
        arch="mlp",
        image_shape=(1, 28, 28),
        latent_dim=40,
        hidden=300,
        likelihood="bernoulli",
        flow=args.flow,
        flow_steps=args.flow_steps,
        flow_hidden=320,
    ).eval()
    x, data_note = load_images(args.data, args.points, args.seed)

    def evaluation(compiled: bool) -> callable:
        return lambda: evaluate(
            model,
            x,
            batch_size=min(args.batch_size, args.points),
            samples=args.samples,
            seed=args.seed,
            chunk_size=args.chunk,
            compile=compiled,
        )

    with torch.no_grad():
        recorder = MatmulRecorder()
        with recorder:
            nll = evaluation(False)()["nll"]
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            evaluation(False)()
    flops = counter.get_total_flops()
    peak = matmul_rate(args.matmul)
    print(
        f"{len(recorder.calls)} matrix products, {flops / 1e9:.1f} GFLOP; {args.matmul}² product at "
        f"{peak / 1e9:.1f} GFLOP/s",
        file=sys.stderr,
    )

    variants = {"matmul replay": replay(recorder.calls), "evaluate, eager": evaluation(False)}
    if not args.no_compile:
        variants["evaluate, compile=True"] = evaluation(True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up; compiles the compiled variant
            fn()
        for r in range(args.repeats):  # interleaved: every variant sees the same stretch of machine load
            for name, fn in variants.items():
                begin = common.clock()
                fn()
                times[name].append(common.clock() - begin)
            print(
                f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()),
                file=sys.stderr,
            )
    medians = {name: float(np.median(t)) for name, t in times.items()}
    return {
        "data": data_note,
        "reuse_freed_memory": tuned,
        "matmul_products": len(recorder.calls),
        "matmul_flops": flops,
        "replayed_flops": product_flops(recorder.calls),
        "peak_flops_per_s": peak,
        "peak_bound_s": flops / peak,
        "nll": nll,
        "variants": [
            {
                "variant": name,
                "seconds": medians[name],
                "seconds_all": sorted(times[name]),
                "of_replay": medians[name] / medians["matmul replay"],
                "of_peak_bound": medians[name] * peak / flops,
            }
            for name in variants
        ],
    }


def render(results: dict, info: dict, args: argparse.Namespace) -> str:
    rows = [
        [v["variant"], f"{v['seconds']:.3f}", f"{v['of_replay']:.2f}×", f"{v['of_peak_bound']:.2f}×"]
        for v in results["variants"]
    ]
    return "\n".join(
        [
            "# importance-weighted −log p(x) against its matrix products: "
            f"MLP VAE + {args.flow}×{args.flow_steps} on h, K = {args.samples}, {args.points} images "
            f"in batches of {min(args.batch_size, args.points)}",
            "",
            f"Machine: {machine_line(info)}. Data: {results['data']}.",
            f"{results['matmul_products']} matrix products, {results['matmul_flops'] / 1e9:.1f} GFLOP counted by "
            f"FlopCounterMode, {results['replayed_flops'] / 1e9:.1f} GFLOP replayed; the {args.matmul}² "
            f"float32 product runs at {results['peak_flops_per_s'] / 1e9:.1f} GFLOP/s, so the peak bound is "
            f"{results['peak_bound_s']:.3f} s. Medians of {args.repeats} interleaved repeats; −log p(x) = "
            f"{results['nll']:.2f} nats (an untrained model). Allocator: "
            + (
                "reuse_freed_memory() applied, as by the flowvae command."
                if results["reuse_freed_memory"]
                else "glibc's defaults."
            ),
            "",
            markdown_table(["variant", "seconds", "÷ matmul replay", "÷ peak bound"], rows),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.samples, args.repeats, args.no_compile = min(args.samples, 50), 1, True
    threads, info, load = start(args)
    report("iw_eval", args, info, threads, run(args), render, load)


if __name__ == "__main__":
    main()
