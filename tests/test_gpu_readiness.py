"""GPU readiness checked on a CPU: every parameter is used (DDP), densities are summed in float32
under bf16 autocast, and no host read or CPU tensor enters a training step on (fake) CUDA."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowvae.evaluation import evaluate
from flowvae.models import ModelConfig, build_model

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

# Every architecture × no flow / a flow with context / a flow without (ResNet flows always read their context).
MODEL_MATRIX = [(arch, flow, context) for arch, flow, context in itertools.product(
    ("mlp", "conv", "gated", "ladder", "resnet"), ("none", "iaf"), (True, False))
    if not (flow == "none" and not context) and not (arch == "resnet" and not context)]


def tiny_model(arch: str, flow: str, context: bool) -> torch.nn.Module:
    config = ModelConfig(arch=arch, latent_dim=2 if arch == "resnet" else 4, layers=2, hidden=16, channels=8,
                         feature_dim=16, flow=flow, flow_steps=1, flow_hidden=8, flow_context=context)
    return build_model(config, (1, 8, 8), "binary")


@pytest.mark.parametrize("arch,flow,context", MODEL_MATRIX)
def test_every_parameter_gets_a_gradient(arch, flow, context):
    """A parameter outside the graph makes DDP (without find_unused_parameters) fail at its second step."""
    torch.manual_seed(0)
    model = tiny_model(arch, flow, context)
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.5))
    (-model(x).log_weight.mean()).backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters outside the graph: {unused}"


def test_ladder_loads_a_checkpoint_with_unused_context_networks():
    """Earlier ladders without a conditioned flow saved context networks that nothing read."""
    torch.manual_seed(0)
    model = tiny_model("ladder", "none", True)
    state = model.state_dict() | {"contexts.0.0.weight": torch.zeros(16, 32), "contexts.0.0.bias": torch.zeros(16)}
    model.load_state_dict(state)
    assert not any(name.startswith("contexts.") for name in model.state_dict())


def test_ddp_matches_one_process_for_every_architecture_and_flow():
    """Two gloo workers take three steps on halves of the batch for each model of the matrix, and end
    with the parameters of one process stepping on the whole batch (the worker script asserts it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_matrix_worker.py")]
    env = os.environ | {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("same parameters") == len(MODEL_MATRIX), result.stdout


@pytest.mark.parametrize("extra", [("--flow", "none"), ("--no-flow-context",)], ids=["no-flow", "no-context"])
def test_torchrun_trains_a_ladder_without_flow_context_like_one_worker(tmp_path, extra):
    """flowvae train --arch ladder --flow none under torchrun failed at its second step."""
    from test_distributed import assert_same_params, flowvae_train

    extra = ("--arch", "ladder", "--layers", "2", *extra)
    flowvae_train(tmp_path / "one", epochs=2, workers=1, extra=extra)
    flowvae_train(tmp_path / "two", epochs=2, workers=2, extra=extra)
    assert_same_params(tmp_path / "one", tmp_path / "two")


def test_bf16_importance_weighted_nll_equals_fp32_on_the_same_noise():
    """Σ_pixels x·logit ≈ 800 nats summed in bf16 rounds by 4 nats a sample, and the log-mean-exp over K
    made that noise a 0.5 nats optimistic -log p(x); the likelihood now sums in float32."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="mlp", latent_dim=32, hidden=300, flow="iaf", flow_steps=2,
                                    flow_hidden=320), (1, 28, 28), "binary")
    g = torch.Generator().manual_seed(1)
    template = torch.bernoulli(torch.full((784,), 0.13), generator=g)
    with torch.no_grad():  # confident logits, as a trained model's: ±8 towards a template image
        model.decoder.net[-2].bias.copy_(8.0 * (2 * template - 1))
    x = ((template + torch.bernoulli(torch.full((20, 784), 0.02), generator=g)) % 2).view(20, 1, 28, 28)
    nll = {precision: evaluate(model, x, batch_size=20, samples=200, chunk_size=100, seed=0,
                               precision=precision)["nll"] for precision in ("fp32", "bf16")}
    assert nll["bf16"] == pytest.approx(nll["fp32"], abs=0.05)


def test_a_cuda_checkpoint_holds_and_restores_the_device_global_generator(monkeypatch):
    """The Gaussian likelihood's dequantization noise draws from the device's global generator: on CUDA
    its state is saved and set again on resume (torch.cuda stood in for; only a GPU runs the real one)."""
    from flowvae import training

    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.full((16,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update(state=state, device=device))
    cuda = torch.device("cuda", 0)
    generators = {name: torch.Generator() for name in ("shuffle", "noise", "binarize")}
    saved = {"torch": torch.get_rng_state(), "noise_device": "cuda", **training._device_rng_state(cuda),
             **{name: g.get_state() for name, g in generators.items()}}
    training._restore_rng(saved, generators, cuda, training.TrainConfig(), training.RunState())
    assert torch.equal(restored["state"], torch.full((16,), 7, dtype=torch.uint8)) and restored["device"] == cuda
    assert training._device_rng_state(torch.device("cpu")) == {}
