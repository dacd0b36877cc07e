"""Training throughput (images/s) of flowvae VAEs with an IAF posterior, by precision and compilation.

    python benchmarks/gpu_throughput.py                      # on CUDA when available, else CPU
    python benchmarks/gpu_throughput.py --device cpu --quick  # smoke run

Models: the MLP VAE (784-300-300, z = 40) and the gated-convolution VAE of van den Berg et al.
(z = 64), each with 4 IAF steps of MADE width 320, on 28x28 binary images, batch 100 (MLP) / 100
(gated).  For each: fp32 and bf16 autocast, with and without ``torch.compile``.  Median time per
training step after warm-up (compilation excluded), images/s, peak GPU memory.  Prints a
Markdown table and writes benchmarks/results/gpu_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from flowvae import objectives
from flowvae.models import build_vae

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(arch: str, latent: int, batch: int, precision: str, compile_model: bool, device: torch.device,
                  steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_vae(arch, (1, 28, 28), latent, "bernoulli", flow="iaf", flow_steps=4, flow_hidden=320).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    step_model = torch.compile(model) if compile_model else model
    x = torch.bernoulli(torch.full((batch, 1, 28, 28), 0.3, device=device))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            ld = step_model(x)
        loss = objectives.training_loss(ld)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for _ in range(3):  # warm-up, compilation included
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        times.append((time.perf_counter() - t0) / steps)
    ms = statistics.median(times) * 1e3
    return {"arch": arch, "latent": latent, "batch": batch, "precision": precision, "compile": compile_model,
            "ms_per_step": round(ms, 3), "images_per_s": round(batch / ms * 1e3, 1),
            "warmup_s": round(warmup_s, 2),
            "peak_mem_mib": round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1) if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="few steps, fp32 only, no compile")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    steps, repeats = (3, 2) if args.quick else (args.steps, args.repeats)
    precisions = ["fp32"] if args.quick else ["fp32", "bf16"]
    compiles = [False] if args.quick or args.no_compile else [False, True]
    rows = [time_training(arch, latent, 100, p, c, device, steps, repeats)
            for arch, latent in (("mlp", 40), ("gated", 64)) for p in precisions for c in compiles]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = ["arch", "z", "batch", "precision", "compile", "ms/step", "images/s", "warm-up s", "peak MiB"]
    lines = [f"Device: {name}; torch {torch.__version__}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['latent']} | {r['batch']} | {r['precision']} | {r['compile']} | "
                     f"{r['ms_per_step']} | {r['images_per_s']} | {r['warmup_s']} | {r['peak_mem_mib']} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_throughput.json").write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                             "rows": rows}, indent=2))
    (RESULTS / "gpu_throughput.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
