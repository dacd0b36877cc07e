"""Shared test options: ``--device cuda`` runs the device-aware tests on a GPU."""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="torch device for device-aware tests (cpu or cuda)")


@pytest.fixture
def device(request) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"--device {name} asked for, but CUDA is not available")
    return torch.device(name)
