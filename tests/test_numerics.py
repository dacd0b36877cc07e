"""Likelihood numerics against exact references: the discretized logistic's bin masses, dequantized
Gaussian bits/dim, the data's dtype following the model's; and CUDA tests running without TF32."""

from __future__ import annotations

import math

import pytest
import torch

from flowvae.models import build_likelihood, build_vae
from flowvae.models.likelihoods import DiscretizedLogistic, Gaussian


def exact_discretized_logistic(mean: float, log_scale: float, x: float) -> float:
    """log ∫ logistic(t; mean, e^log_scale) dt over x's bin, in 60-digit arithmetic.

    x is the pixel scaled to [-1, 1] (bin half-width 1/255); the edge bins take the tails.  On each
    side of the mean the CDF difference is taken where it is small, so nothing cancels.
    """
    mpmath = pytest.importorskip("mpmath")  # installed with torch (through sympy)
    with mpmath.workdps(60):
        s, half = mpmath.exp(mpmath.mpf(log_scale)), mpmath.mpf(1) / 255
        a, b = (mpmath.mpf(x) - half - mpmath.mpf(mean)) / s, (mpmath.mpf(x) + half - mpmath.mpf(mean)) / s

        def sigmoid(t):
            return 1 / (1 + mpmath.exp(-t))

        if x < -0.999:
            mass = sigmoid(b)
        elif x > 0.999:
            mass = sigmoid(-a)
        elif a > 0:
            mass = sigmoid(-a) - sigmoid(-b)
        else:
            mass = sigmoid(b) - sigmoid(a)
        return float(mpmath.log(mass))


MEANS = [-1.1, -0.73, -0.2, 0.0, 0.1, 0.35, 0.8, 1.05]
LOG_SCALES = [-7.0, -6.0, -4.5, -3.0, -1.5, 0.0, 1.0]
PIXELS = sorted({0, 1, 2, 127, 128, 143, 253, 254, 255, *range(5, 255, 9)})


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-11, 1e-11)])
def test_discretized_logistic_bin_masses_are_exact(dtype, rtol, atol):
    """Every bin, near the mean and far in the tails (down to ~-2e4 nats), against 60-digit maths."""
    lik = DiscretizedLogistic()
    grid = torch.tensor([(m, s, p) for m in MEANS for s in LOG_SCALES for p in PIXELS], dtype=torch.float64)
    mean, log_scale, pixel = grid.to(dtype).unbind(-1)
    params = torch.stack([mean, log_scale], -1).view(-1, 2, 1, 1)
    x = lik.prepare(pixel.to(torch.uint8).view(-1, 1, 1, 1), dtype=dtype)
    got = lik.log_prob(params, x)
    exact = torch.tensor(
        [
            exact_discretized_logistic(m, s, xi)
            for m, s, xi in zip(mean.tolist(), log_scale.tolist(), x.flatten().tolist())
        ],
        dtype=torch.float64,
    )
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), exact, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discretized_logistic_tail_bin_of_the_review(dtype):
    """μ = 0.1, log-scale -7, pixel 143: the pdf-at-the-centre approximation gave -21.50 nats."""
    lik = DiscretizedLogistic()
    params = torch.tensor([0.1, -7.0], dtype=dtype).view(1, 2, 1, 1)
    x = lik.prepare(torch.tensor([143], dtype=torch.uint8).view(1, 1, 1, 1), dtype=dtype)
    exact = exact_discretized_logistic(float(params[0, 0]), -7.0, float(x))
    assert exact == pytest.approx(-19.35, abs=0.01)
    assert lik.log_prob(params, x).item() == pytest.approx(exact, rel=1e-6)


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


def sharp_gaussian_at_bin_centres(x: torch.Tensor, log_std: float) -> torch.Tensor:
    """Gaussian-likelihood params (1, 2C, H, W): mean at each pixel's bin centre (x + 0.5)/256."""
    mean = (x.double() + 0.5) / 256.0
    raw = torch.full_like(mean, 7.0 * math.atanh(log_std / 7.0))  # undo the soft clamp
    return torch.stack([mean, raw], 2).flatten(1, 2)


def test_gaussian_on_8bit_data_is_dequantized_so_bits_per_dim_bound_minus_log_P():
    """A density spiked at the bin centres: at the centres -log p(x) + D ln 256 is -0.63 bits/dim,
    which no probability can give (-log P(x) >= 0); over uniformly dequantized pixels it is an upper bound."""
    lik = build_likelihood("gaussian", "8bit")
    torch.manual_seed(0)
    x = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    dim, log_std = x[0].numel(), -6.9
    params = sharp_gaussian_at_bin_centres(x, log_std)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [lik.log_prob(params, lik.prepare(x, dtype=torch.float64, generator=generator)) for _ in range(16)]
    )
    nll = -draws.mean() + lik.discrete_nats_offset(dim)
    assert nll / (dim * math.log(2)) >= 0.0
    # E_u[-log N((x + u)/256; centre, σ²)] = log σ + ½ log 2π + (1/256)²/(24 σ²) per pixel, exactly.
    expected = dim * (log_std + 0.5 * math.log(2 * math.pi) + 1 / (24 * 256**2 * math.exp(2 * log_std)))
    standard_error = draws.std() / math.sqrt(len(draws))
    assert abs(-draws.mean().item() - expected) < 4 * standard_error
    exact_minus_log_P = -dim * math.log(math.erf(0.5 / 256 / math.exp(log_std) / math.sqrt(2)))
    assert expected + lik.discrete_nats_offset(dim) >= exact_minus_log_P


def test_gaussian_dequantization_stays_in_the_bin_follows_the_generator_and_the_dtype():
    lik = Gaussian("8bit")
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    y = lik.prepare(x, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert y.dtype == torch.float64
    u = y * 256 - x.double()
    assert ((u >= 0) & (u < 1)).all() and u.std() > 0.2  # one uniform draw per pixel
    torch.testing.assert_close(
        lik.prepare(x, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), y, rtol=0, atol=0
    )
    assert not torch.equal(lik.prepare(x, dtype=torch.float64), lik.prepare(x, dtype=torch.float64))
    assert lik.prepare(x).dtype == torch.float32


@pytest.mark.parametrize("kind", ["binary", "grayscale"])
def test_gaussian_refuses_binary_data(kind):
    with pytest.raises(ValueError, match="not a probability"):
        build_likelihood("gaussian", kind)


def test_full_precision_matmul_turns_tf32_off_and_restores_the_settings():
    from conftest import full_precision_matmul

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.allow_tf32 = True
        with full_precision_matmul():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_device_fixture_runs_cuda_tests_without_tf32(device):
    if device.type != "cuda":
        pytest.skip("TF32 exists only on CUDA; run with --device cuda")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
