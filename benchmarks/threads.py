"""Training and evaluation speed on a quiet and on a busy machine, under several OpenMP wait policies.

torch's OpenMP threads spin-wait for each other at the end of every parallel region.  When another
process keeps a core busy, the OS deschedules one of them and the other spins away its time slice:
on 2 cores, 2-thread training ran ~17× slower beside one busy process.  This script measures each
policy (environment set before torch is imported, in a fresh process per measurement) with 0, 1
and 2 competing busy processes, in interleaved rounds, and reports the median steps/s.

    python benchmarks/threads.py --busy 0 1 2 --rounds 3                # README model and ladder
    python benchmarks/threads.py --models readme --policies default flowvae passive --busy 0

Policies: ``default`` (libgomp's own: spin 300,000 iterations before sleeping), ``flowvae`` (what
``import flowvae`` does when the user has set nothing: passive when other processes keep the CPUs
busy at import, libgomp's default otherwise), ``passive`` (OMP_WAIT_POLICY=PASSIVE: sleep at once),
``spinN`` (GOMP_SPINCOUNT=N, e.g. spin10k), ``threads1`` (one thread, no waits at all).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, machine_line, markdown_table, save

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    # README's MNIST tier: MLP + IAF×4 on h, the library's defaults.
    "readme": {"dataset": "binarized_mnist", "model": {"flow": "iaf", "flow_steps": 4}},
    # configs/mnist_ladder_cpu.yaml's model, eager.
    "ladder": {
        "dataset": "binarized_mnist",
        "model": {
            "arch": "ladder",
            "layers": 2,
            "latent_dim": 32,
            "hidden": 300,
            "flow": "iaf",
            "flow_steps": 2,
            "flow_hidden": 320,
            "prior": "flow",
        },
    },
}
POLICIES = {
    "default": {"GOMP_SPINCOUNT": "300000"},
    "flowvae": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "threads1": {"OMP_NUM_THREADS": "1"},
}
HOG = "while True: pass"

WORKER = r"""
import json, sys, time
import flowvae  # applies flowvae's threading default where the environment leaves it open
import torch
from flowvae import objectives
from flowvae.config import TrainConfig
from flowvae.evaluation import evaluate
from flowvae.models import build_model
from flowvae.training import prepare_data

spec, mode, seconds, data_dir = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
config = TrainConfig.from_dict(spec | {"data_dir": data_dir})
data = prepare_data(config)
torch.manual_seed(0)
model = build_model(config.model, tuple(data.train.shape[1:]), data.splits.kind)
if mode == "train":
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    def step(i):
        x = data.train[(i % 400) * 100:(i % 400 + 1) * 100]
        loss = objectives.training_loss(model(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for i in range(5):
        step(i)
    started, count = time.perf_counter(), 0
    while count < 3 or time.perf_counter() - started < seconds:
        step(count)
        count += 1
else:  # importance-weighted evaluation, K = 1000, 10 test images at a time
    evaluate(model, data.test[:10], samples=50, seed=0)
    started, count = time.perf_counter(), 0
    while count < 10 or time.perf_counter() - started < seconds:
        evaluate(model, data.test[count:count + 10], samples=1000, seed=0)
        count += 10
print(json.dumps({"seconds": time.perf_counter() - started, "count": count, "threads": torch.get_num_threads()}))
"""


def policy_env(name: str) -> dict[str, str]:
    if name.startswith("spin"):
        return {"GOMP_SPINCOUNT": name[4:].replace("k", "000")}
    return POLICIES[name]


def run_once(model: str, mode: str, seconds: float, policy: str, data_dir: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env |= policy_env(policy) | {"PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(MODELS[model]), mode, str(seconds), data_dir],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["rate"] = result["count"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["readme", "ladder"], choices=sorted(MODELS))
    parser.add_argument("--modes", nargs="+", default=["train"], choices=["train", "eval"])
    parser.add_argument("--policies", nargs="+", default=["default", "flowvae", "passive", "threads1"])
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 1, 2], help="competing busy processes")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every policy")
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="timed seconds per run (at least 3 training steps or 10 test images)"
    )
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default="threads")
    args = parser.parse_args()
    rows = []
    for busy in args.busy:
        hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(busy)]
        try:
            time.sleep(1.0 if busy else 0.0)
            for model in args.models:
                for mode in args.modes:
                    rates: dict[str, list[float]] = {p: [] for p in args.policies}
                    for r in range(args.rounds):
                        order = args.policies[r % len(args.policies) :] + args.policies[: r % len(args.policies)]
                        for policy in order:
                            rates[policy].append(run_once(model, mode, args.seconds, policy, args.data_dir)["rate"])
                    base = statistics.median(rates[args.policies[0]])
                    for policy, values in rates.items():
                        median = statistics.median(values)
                        rows.append(
                            {
                                "model": model,
                                "mode": mode,
                                "busy": busy,
                                "policy": policy,
                                "rate": median,
                                "min": min(values),
                                "max": max(values),
                                "vs_first": median / base,
                                "unit": "steps/s" if mode == "train" else "images/s",
                            }
                        )
                        print(
                            f"{model:7s} {mode:5s} busy={busy} {policy:9s} {median:8.2f} {rows[-1]['unit']} "
                            f"({min(values):.2f}-{max(values):.2f})  {median / base:5.2f}x {args.policies[0]}",
                            flush=True,
                        )
        finally:
            for hog in hogs:
                hog.kill()
    info = machine() | {"torch_threads": None}  # each measurement sets its own, in its own process
    table = markdown_table(
        ["model", "mode", "busy processes", "policy", "rate (median)", "range", "÷ first policy"],
        [
            [
                r["model"],
                r["mode"],
                r["busy"],
                r["policy"],
                f"{r['rate']:.2f} {r['unit']}",
                f"{r['min']:.2f}–{r['max']:.2f}",
                f"{r['vs_first']:.2f}",
            ]
            for r in rows
        ],
    )
    paths = save(
        args.out,
        {"machine": info, "args": vars(args), "rows": rows},
        f"# {machine_line(info | {'torch_threads': 'per-policy'})}\n\n{table}",
    )
    print(f"saved {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
