"""Likelihood numerics against exact references: the discretized logistic's bin masses, dequantized
Gaussian bits/dim, and the data's dtype following the model's."""

from __future__ import annotations

import math

import pytest
import torch

from flowvae.models import build_vae


def test_float64_model_scores_8bit_data_in_float64():
    """The data follow the decoder's dtype: pixel/127.5 - 1 rounded to float32 moves a sharp
    logistic's log-mass by ~1e-4 nats, far beyond float64's 1e-12."""
    torch.manual_seed(0)
    model = build_vae("mlp", (1, 4, 4), 3, "discretized_logistic", hidden=8, data_kind="8bit").double()
    with torch.no_grad():
        model.decoder.net[-2].bias.view(2, 4, 4)[1].fill_(-6.0)  # log-scales: sharp bins
    x = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    noise = torch.randn(2, 5, 3, dtype=torch.float64)
    q = model.posterior(x)
    ld = model.log_densities(x, q, 2, noise)
    assert ld.log_likelihood.dtype == torch.float64
    params = model.decode(q.rsample_and_log_prob((2,), noise)[0])
    reference = model.likelihood.log_prob(params, x.double() / 127.5 - 1.0)
    torch.testing.assert_close(ld.log_likelihood, reference, rtol=0, atol=1e-12)


def test_autocast_scores_data_in_at_least_float32():
    torch.manual_seed(0)
    model = build_vae("mlp", (1, 4, 4), 3, "discretized_logistic", hidden=8, data_kind="8bit")
    x = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ld = model(x, samples=2)
    assert ld.log_likelihood.dtype == torch.float32 and torch.isfinite(ld.log_likelihood).all()
