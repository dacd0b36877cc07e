"""The benchmark scripts still run end to end (their smoke modes), so that they cannot rot unseen."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_peers_quick_compares_flowvae_on_h_and_global(tmp_path):
    done = run_script(
        "peers.py",
        "--quick",
        "--libraries",
        "flowvae",
        "--flows",
        "planar",
        "--threads",
        "1",
        "--sample-count",
        "50",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| flowvae |")]
    assert [row.split("|")[2].strip() for row in rows] == ["planar×10 on h", "planar×10 global"]
    assert "results not saved" in done.stderr


def test_mnist_table_smoke_trains_evaluates_and_resumes(tmp_path):
    args = ("--budget", "smoke", "--families", "none", "iaf", "--threads", "1", "--out-dir", str(tmp_path / "runs"))
    first = run_script("mnist_table.py", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "| no flow |" in first.stdout and "| IAF ×2 |" in first.stdout
    results = sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("results.json"))
    assert len(results) == 2
    again = run_script("mnist_table.py", *args, cwd=tmp_path)  # finished runs are read back, not retrained
    tables = [[line for line in done.stdout.splitlines() if line.startswith("|")] for done in (first, again)]
    assert again.returncode == 0 and tables[0] == tables[1] and len(tables[0]) >= 4


def test_gpu_throughput_quick_times_the_real_trainer_step_and_the_bare_model(tmp_path):
    done = run_script(
        "gpu_throughput.py", "--device", "cpu", "--quick", "--threads", "1", "--out", str(tmp_path), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_throughput.json").read_text())["rows"]
    assert sorted(r["kind"] for r in rows) == ["model", "preset", "preset", "trainer"]
    assert all(r["images_per_s"] > 0 and r["flags"]["float32_matmul_precision"] for r in rows)
    assert "| mlp | 40 | 100 | fp32 | False |" in done.stdout
    # The GPU presets as configured (shrunk by --quick): their bf16 precision, not the sweep's fp32.
    assert {r["arch"]: r["precision"] for r in rows if r["kind"] == "preset"} == {
        "mnist_resnet_iaf_gpu": "bf16",
        "cifar10_resnet_iaf": "bf16",
    }
    assert "| cifar10_resnet_iaf | 8 | bf16 | False |" in done.stdout


def test_iw_eval_quick_replays_every_matrix_product_of_the_evaluation(tmp_path):
    done = run_script(
        "iw_eval.py", "--quick", "--threads", "1", "--points", "20", "--data", str(tmp_path / "none.npz"), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    counted = re.search(r"([\d.]+) GFLOP counted by FlopCounterMode, ([\d.]+) GFLOP replayed", done.stdout)
    assert counted and counted.group(1) == counted.group(2) and float(counted.group(1)) > 0
    assert "| matmul replay |" in done.stdout and "| evaluate, eager |" in done.stdout


def test_threads_benchmark_times_each_policy_in_its_own_process(tmp_path):
    out = tmp_path / "threads"
    done = run_script(
        "threads.py",
        "--models",
        "readme",
        "--modes",
        "train",
        "eval",
        "--policies",
        "flowvae",
        "threads1",
        "--busy",
        "0",
        "--rounds",
        "1",
        "--seconds",
        "0.1",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["mode"], r["policy"]) for r in rows] == [
        ("train", "flowvae"),
        ("train", "threads1"),
        ("eval", "flowvae"),
        ("eval", "threads1"),
    ]
    assert all(r["rate"] > 0 for r in rows)
