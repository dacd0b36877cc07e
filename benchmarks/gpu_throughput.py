"""Training throughput (images/s) of flowvae VAEs with an IAF posterior: the real trainer step.

    python benchmarks/gpu_throughput.py                       # on CUDA when available, else CPU
    python benchmarks/gpu_throughput.py --device cpu --quick  # smoke run (seconds)

Models: the MLP VAE (784-300-300, z = 40) and the gated-convolution VAE of van den Berg et al.
(z = 64), each with 4 IAF steps of MADE width 320, on random 28x28 binary images.

Two kinds of row:

* ``trainer``: what ``flowvae train`` runs per step, timed as whole epochs of
  :func:`flowvae.training.train_epoch` on a real run (the data on the device, shuffling, the
  posterior's noise, autocast, fused Adam, the gradient guard, the loss accumulation), on a dataset
  of ``batch x steps`` images registered for the benchmark.
* ``model``: the model's forward and backward and the same fused Adam on one fixed on-device batch,
  nothing else: the bound the trainer's own work is measured against.

For each: batch 100 and 1000, fp32 / TF32 (CUDA only) / bf16 / fp16, eager and ``torch.compile``.

* ``preset``: the trainer step of each GPU preset in ``configs/`` as configured (ResNet VAE, Adamax,
  EMA, free bits, bf16, ``torch.compile``, its batch size) on random images of its data's shape,
  which the rows above (Adam, no EMA, no free bits) do not exercise.  ``--quick`` shrinks them.

Median of ``--repeats`` timings after a warm-up (compilation excluded), images/s, peak GPU memory,
and the numerics flags in force.  Every row starts from ``torch._dynamo.reset()``, so no row runs
eager past the recompile limit while reported as compiled.  Prints a Markdown table, writes
``benchmarks/results/gpu_throughput.{json,md}`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flowvae import distributed, objectives, training
from flowvae.config import TrainConfig
from flowvae.config_yaml import load_yaml
from flowvae.data.registry import DatasetSplits, register
from flowvae.evaluation import autocast
from flowvae.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARCHS = {"mlp": 40, "gated": 64}
PRESETS = ("mnist_resnet_iaf_gpu", "cifar10_resnet_iaf")
DATASET = "throughput_random28"
DATASET_RGB = "throughput_random_rgb32"  # CIFAR-10's shape and kind: 3x32x32, 8-bit
_images: dict[str, int] = {"train": 0}


@register(DATASET)
def _random_binary_images(data_dir: Path, *, download: bool, seed: int) -> DatasetSplits:
    """``_images["train"]`` random binary 28x28 images (and 100 for valid and test)."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> torch.Tensor:
        return torch.bernoulli(torch.full((n, 1, 28, 28), 0.3), generator=g)

    return DatasetSplits(DATASET, draw(_images["train"]), draw(100), draw(100), "binary")


@register(DATASET_RGB)
def _random_rgb_images(data_dir: Path, *, download: bool, seed: int) -> DatasetSplits:
    """``_images["train"]`` random 8-bit 3x32x32 images (and 100 for valid and test)."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)

    return DatasetSplits(DATASET_RGB, draw(_images["train"]), draw(100), draw(100), "8bit")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _numerics(precision: str) -> tuple[str, bool]:
    """(autocast precision, TF32 on): TF32 is fp32 storage with TF32 matmuls and convolutions."""
    return ("fp32", True) if precision == "tf32" else (precision, False)


def _config(arch: str, batch: int, precision: str, compile_model: bool, device: torch.device, out: str) -> TrainConfig:
    amp, tf32 = _numerics(precision)
    return TrainConfig.from_dict(
        {
            "dataset": DATASET,
            "batch_size": batch,
            "precision": amp,
            "tf32": tf32,
            "compile": compile_model,
            "device": str(device),
            "progress": False,
            "out": out,
            "grad_skip": 50.0,
            "model": {"arch": arch, "latent_dim": ARCHS[arch], "flow": "iaf", "flow_steps": 4, "flow_hidden": 320},
        }
    )


def preset_config(name: str, device: torch.device, out: str, compile_model: bool, quick: bool) -> TrainConfig:
    """The preset ``configs/NAME.yaml`` as it trains, on random images of its data's shape;
    ``quick``: 2 layers of 8 channels, batch 8 (a smoke run)."""
    values = load_yaml(CONFIGS / f"{name}.yaml")
    rgb = values["dataset"] == "cifar10"
    values |= {
        "dataset": DATASET_RGB if rgb else DATASET,
        "device": str(device),
        "out": out,
        "progress": False,
        "compile": compile_model and values.get("compile", False),
        "max_minutes": 0,
    }
    if quick:
        values["model"] |= {"layers": 2, "channels": 8, "flow_hidden": 8}
        values["batch_size"] = 8
    return TrainConfig.from_dict(values)


def time_trainer(config: TrainConfig, device: torch.device, steps: int, repeats: int) -> list[float]:
    """Seconds per step of :func:`flowvae.training.train_epoch`, one epoch of ``steps`` steps per repeat."""
    _images["train"] = config.batch_size * steps
    run = training.start_run(config, resume=False, context=distributed.Context(), device=device)
    training.train_epoch(run)  # warm-up: compilation, allocator, fused kernels
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        training.train_epoch(run)  # ends with the guard's sync and the epoch loss read on the host
        times.append((time.perf_counter() - t0) / steps)
    return times


def time_model(config: TrainConfig, device: torch.device, steps: int, repeats: int) -> list[float]:
    """Seconds per step of forward, backward and fused Adam on one fixed batch: no trainer work."""
    torch.manual_seed(0)
    training.configure_backends(config, device)
    model = build_model(config.model, (1, 28, 28), "binary").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=device.type in ("cpu", "cuda"))
    step_model = torch.compile(model) if config.compile else model
    x = torch.bernoulli(torch.full((config.batch_size, 1, 28, 28), 0.3, device=device))

    def step() -> None:
        with autocast(device, config.precision):
            ld = step_model(x)
        loss = objectives.training_loss(ld)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return times


def measure(
    kind: str,
    arch: str,
    batch: int,
    precision: str,
    compile_model: bool,
    device: torch.device,
    steps: int,
    repeats: int,
    quick: bool = False,
) -> dict:
    """One row; ``kind`` 'preset' times the trainer on the preset named ``arch``, as configured."""
    torch._dynamo.reset()  # a fresh compilation budget per row: none silently falls back to eager
    with tempfile.TemporaryDirectory() as out:
        if kind == "preset":
            config = preset_config(arch, device, out, compile_model, quick)
            batch, precision, compile_model = config.batch_size, config.precision, config.compile
        else:
            config = _config(arch, batch, precision, compile_model, device, out)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer = time_model if kind == "model" else time_trainer
        started = time.perf_counter()
        times = timer(config, device, steps, repeats)
        total_s = time.perf_counter() - started
    ms = statistics.median(times) * 1e3
    flags = {
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    latent = ARCHS.get(arch, config.model.latent_dim)
    return {
        "kind": kind,
        "arch": arch,
        "latent": latent,
        "batch": batch,
        "precision": precision,
        "compile": compile_model,
        "ms_per_step": round(ms, 3),
        "ms_range": [round(min(times) * 1e3, 3), round(max(times) * 1e3, 3)],
        "images_per_s": round(batch / ms * 1e3, 1),
        "total_s": round(total_s, 1),
        "flags": flags,
        "peak_mem_mib": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="MLP, batch 100, fp32, eager, few steps: a smoke run")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--batches", nargs="+", type=int, default=[100, 1000])
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=None,
        choices=["fp32", "tf32", "bf16", "fp16"],
        help="default: fp32 tf32 bf16 fp16 on CUDA, fp32 bf16 on a CPU",
    )
    parser.add_argument("--kinds", nargs="+", default=["trainer", "model"], choices=["trainer", "model"])
    parser.add_argument(
        "--presets",
        nargs="*",
        default=list(PRESETS),
        choices=list(PRESETS),
        help="GPU presets whose real configuration is timed (none: --presets without names)",
    )
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--steps", type=int, default=30, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu_throughput.{json,md}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = args.precisions or (["fp32", "tf32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"])
    if "tf32" in precisions and device.type != "cuda":
        parser.error("--precisions tf32 needs a CUDA device")
    archs, batches, compiles, steps, repeats = (
        args.archs,
        args.batches,
        [False, True] if not args.no_compile else [False],
        args.steps,
        args.repeats,
    )
    if args.quick:
        archs, batches, precisions, compiles, steps, repeats = ["mlp"], [100], ["fp32"], [False], 3, 2
    rows = []
    for arch in archs:
        for batch in batches:
            for precision in precisions:
                for compile_model in compiles:
                    for kind in args.kinds:
                        rows.append(measure(kind, arch, batch, precision, compile_model, device, steps, repeats))
                        r = rows[-1]
                        print(
                            f"{kind:7s} {arch:5s} batch {batch:5d} {precision} compile={compile_model}: "
                            f"{r['images_per_s']:.0f} images/s",
                            flush=True,
                        )
    for preset in args.presets:
        for compile_model in compiles:
            rows.append(measure("preset", preset, 0, "", compile_model, device, steps, repeats, quick=args.quick))
            r = rows[-1]
            print(
                f"preset  {preset} batch {r['batch']} {r['precision']} compile={r['compile']}: "
                f"{r['images_per_s']:.0f} images/s",
                flush=True,
            )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = [
        "arch",
        "z",
        "batch",
        "precision",
        "compile",
        "trainer images/s",
        "model images/s",
        "trainer/model",
        "trainer ms/step (range)",
        "peak MiB",
    ]
    lines = [
        f"Device: {name}; torch {torch.__version__}; {steps} steps x {repeats} repeats, median",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    presets = [r for r in rows if r["kind"] == "preset"]
    rows_ab = [r for r in rows if r["kind"] != "preset"]
    for key in dict.fromkeys((r["arch"], r["batch"], r["precision"], r["compile"]) for r in rows_ab):
        found = {r["kind"]: r for r in rows_ab if (r["arch"], r["batch"], r["precision"], r["compile"]) == key}
        trainer, model = found.get("trainer"), found.get("model")
        first = trainer or model
        ratio = f"{trainer['images_per_s'] / model['images_per_s']:.2f}" if trainer and model else "–"
        timing = f"{trainer['ms_per_step']} ({trainer['ms_range'][0]}–{trainer['ms_range'][1]})" if trainer else "–"
        lines.append(
            f"| {first['arch']} | {first['latent']} | {first['batch']} | {first['precision']} | "
            f"{first['compile']} | {trainer['images_per_s'] if trainer else '–'} | "
            f"{model['images_per_s'] if model else '–'} | {ratio} | {timing} | {first['peak_mem_mib']} |"
        )
    if presets:
        lines += [
            "",
            "Presets as configured (Adamax, EMA, free bits; the trainer's step):",
            "",
            "| preset | batch | precision | compile | images/s | ms/step (range) | peak MiB |",
            "|" + "---|" * 7,
        ]
        lines += [
            f"| {r['arch']} | {r['batch']} | {r['precision']} | {r['compile']} | {r['images_per_s']} | "
            f"{r['ms_per_step']} ({r['ms_range'][0]}–{r['ms_range'][1]}) | {r['peak_mem_mib']} |"
            for r in presets
        ]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_throughput.json").write_text(
        json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2)
    )
    (args.out / "gpu_throughput.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
