"""Shared test options: ``--device cuda`` runs the device-aware tests on a GPU, with TF32 off.

Every other test runs on the CPU, also on a machine with a GPU: without ``--device cuda`` the GPUs
are hidden from the session and from the ``flowvae`` commands it starts, and a training config
that leaves ``device`` at 'auto' resolves to the CPU in-process either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from flowvae.training import loop


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="torch device for device-aware tests (cpu or cuda)")


def pytest_configure(config):
    if not config.getoption("--device").startswith("cuda"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch.cuda; inherited by subprocesses


@pytest.fixture(autouse=True)
def auto_device_is_cpu(monkeypatch) -> None:
    """'auto' means the CPU in tests: only a test that asks for CUDA (the ``device`` fixture) gets it."""
    resolve = loop.resolve_device
    monkeypatch.setattr(loop, "resolve_device", lambda name: resolve("cpu" if name == "auto" else name))


@contextmanager
def full_precision_matmul() -> Iterator[None]:
    """float32 matmuls and convolutions in float32, not TF32 (10-bit mantissa), restored on exit."""
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        # The matmul flag follows the precision; setting it again after "medium" would leave torch
        # with two disagreeing settings, on which get_float32_matmul_precision raises.
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


@pytest.fixture
def device(request) -> Iterator[torch.device]:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"--device {name} asked for, but CUDA is not available")
    device = torch.device(name)
    if device.type != "cuda":
        yield device
        return
    with full_precision_matmul():
        yield device
