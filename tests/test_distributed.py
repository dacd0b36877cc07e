"""torchrun + DDP with the gloo backend on CPU: same parameters and -log p(x) as one process,
and checkpoints that resume on another number of workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FLAGS = [
    "--dataset",
    "digits",
    "--hidden",
    "32",
    "--latent-dim",
    "4",
    "--flow",
    "iaf",
    "--flow-steps",
    "2",
    "--flow-hidden",
    "16",
    "--eval-samples",
    "20",
    "--no-progress",
    "--threads",
    "1",
    "--device",
    "cpu",
]


def flowvae_train(out: Path, epochs: int, workers: int, resume: bool = False, extra: tuple[str, ...] = ()) -> None:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}"]
        if workers > 1
        else [sys.executable]
    )
    cmd = [*launcher, "-m", "flowvae", "train", *FLAGS, "--epochs", str(epochs), "--out", str(out), *extra]
    result = subprocess.run(cmd + (["--resume"] if resume else []), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    if workers > 1:
        assert result.stdout.count('"test_nll"') == 1, "only worker 0 reports"


def params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def assert_same_params(a: Path, b: Path) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_two_workers_match_one_and_resume_across_worker_counts(tmp_path):
    single = tmp_path / "single"
    flowvae_train(single, epochs=3, workers=1)

    # 2 workers for 2 epochs, then 1 worker resumes to 3.
    two_then_one = tmp_path / "two_then_one"
    flowvae_train(two_then_one, epochs=2, workers=2)
    assert json.loads((two_then_one / "results.json").read_text())["workers"] == 2
    flowvae_train(two_then_one, epochs=3, workers=1, resume=True)
    assert_same_params(single, two_then_one)

    # 1 worker for 1 epoch, then 2 workers resume to 3: the distributed evaluation reports too.
    one_then_two = tmp_path / "one_then_two"
    flowvae_train(one_then_two, epochs=1, workers=1)
    flowvae_train(one_then_two, epochs=3, workers=2, resume=True)
    assert_same_params(single, one_then_two)
    expected = json.loads((single / "results.json").read_text())
    got = json.loads((one_then_two / "results.json").read_text())
    assert got["workers"] == 2 and expected["workers"] == 1
    for split in ("train", "valid", "test"):
        for key in expected[split]:
            assert got[split][key] == pytest.approx(expected[split][key], rel=1e-5), (split, key)
    rows = [json.loads(line) for line in (one_then_two / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_time_budget_under_torchrun_agrees_across_workers(tmp_path):
    """--max-minutes all-reduces worker 0's verdict: the collective runs on the compute device."""
    out = tmp_path / "budget"
    flowvae_train(out, epochs=50, workers=2, extra=("--max-minutes", "0.0001"))
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_trained"] == 1 and results["workers"] == 2


def test_two_workers_match_one_for_a_ladder_vae(tmp_path):
    """The hierarchical model's per-layer noise is drawn globally and sharded like the single latent's."""
    ladder = ("--arch", "ladder", "--layers", "2")
    single, double = tmp_path / "one", tmp_path / "two"
    flowvae_train(single, epochs=2, workers=1, extra=ladder)
    flowvae_train(double, epochs=2, workers=2, extra=ladder)
    assert_same_params(single, double)
    a, b = (json.loads((run / "results.json").read_text())["test"] for run in (single, double))
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-5) and set(b["kl_groups"]) == {"z1", "z2"}


@pytest.mark.parametrize("prior", ["flow", "vamp"])
def test_two_workers_match_one_with_a_learnable_prior(tmp_path, prior):
    """A flow prior's and a VampPrior's parameters (the pseudo-inputs) get DDP's averaged gradient too."""
    extra = ("--prior", prior, "--pseudo-inputs", "10", "--prior-flow-steps", "2")
    single, double = tmp_path / "one", tmp_path / "two"
    flowvae_train(single, epochs=2, workers=1, extra=extra)
    flowvae_train(double, epochs=2, workers=2, extra=extra)
    assert_same_params(single, double)
    assert any(k.startswith("prior.") for k in params(single)), "the prior's parameters are in the checkpoint"
    a, b = (json.loads((run / "results.json").read_text())["test"] for run in (single, double))
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-5)
