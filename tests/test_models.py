"""Likelihoods, architectures, and the objectives against closed forms of a linear-Gaussian model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowvae import flows, objectives
from flowvae.models import VAE, GaussianEncoder, build_likelihood, build_vae, count_parameters
from flowvae.models.likelihoods import Gaussian


@pytest.fixture(autouse=True)
def _float64():
    """This module checks maths, so it works in float64."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class LinearGaussianDecoder(nn.Module):
    """p(x|z) = N(x; Wz + b, σ² I) with x shaped (1, 1, X) images; Gaussian likelihood parameters."""

    def __init__(self, latent: int, x_dim: int, log_std: float) -> None:
        super().__init__()
        self.linear = nn.Linear(latent, x_dim)
        self.raw_log_std = nn.Parameter(torch.full((x_dim,), 7.0 * math.atanh(log_std / 7.0)))  # undo soft clamp

    def forward(self, z):
        mean = self.linear(z)
        return torch.stack([mean, self.raw_log_std.expand_as(mean)], 1).unsqueeze(2)  # (N, 2, 1, X)

    def marginal(self) -> torch.distributions.MultivariateNormal:
        """p(x) = N(b, W Wᵀ + σ² I)."""
        w, b = self.linear.weight, self.linear.bias
        sigma2 = torch.exp(2 * 7.0 * torch.tanh(self.raw_log_std / 7.0))
        return torch.distributions.MultivariateNormal(b, w @ w.T + torch.diag(sigma2))


def linear_gaussian_vae(flow: flows.Flow | None = None, latent: int = 2, x_dim: int = 3, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    encoder = GaussianEncoder(nn.Flatten(), x_dim, latent)
    decoder = LinearGaussianDecoder(latent, x_dim, log_std=-0.5)
    return VAE(encoder, decoder, Gaussian("continuous"), latent, (1, 1, x_dim), flow)


def closed_form_elbo(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """E_q[log p(x|z)] + E_q[log p(z)] + H[q] for Gaussian q and the linear-Gaussian decoder."""
    mean, log_std, _ = model.encoder(x)
    dec = model.decoder
    w, b = dec.linear.weight, dec.linear.bias
    sigma2 = torch.exp(2 * 7.0 * torch.tanh(dec.raw_log_std / 7.0))
    var_q = torch.exp(2 * log_std)
    resid = x.flatten(1) - (mean @ w.T + b)
    exp_sq = resid**2 + (var_q.unsqueeze(1) * w.unsqueeze(0) ** 2).sum(-1)  # E_q[(x - Wz - b)²] per x-dim
    log_lik = (-0.5 * exp_sq / sigma2 - 0.5 * torch.log(2 * math.pi * sigma2)).sum(-1)
    log_prior = (-0.5 * (mean**2 + var_q) - 0.5 * math.log(2 * math.pi)).sum(-1)
    entropy = (0.5 * math.log(2 * math.pi * math.e) + log_std).sum(-1)
    return log_lik + log_prior + entropy


def test_elbo_and_its_gradient_match_the_closed_form():
    model = linear_gaussian_vae()
    x = torch.randn(4, 1, 1, 3)
    torch.manual_seed(1)
    samples = 200_000
    ld = model(x, samples=samples)
    estimate = -objectives.negative_elbo(ld)
    exact = closed_form_elbo(model, x)
    standard_error = (ld.log_likelihood - ld.kl).std(0) / math.sqrt(samples)
    assert ((estimate - exact).abs() < 4 * standard_error).all()
    grads_mc = torch.autograd.grad(estimate.sum(), list(model.parameters()))
    grads_exact = torch.autograd.grad(exact.sum(), list(model.parameters()))
    for g_mc, g in zip(grads_mc, grads_exact):
        torch.testing.assert_close(g_mc, g, atol=0.05, rtol=0.02)


def posterior_vae(flow: flows.Flow | None = None, mean_shift: float = 0.0, std_scale: float = 1.0) -> VAE:
    """Linear-Gaussian VAE whose exact posterior is diagonal (W has orthogonal columns, σ = 1); the
    encoder outputs that posterior with its mean shifted and its std scaled."""
    model = linear_gaussian_vae(flow)
    dec = model.decoder
    q, _ = torch.linalg.qr(torch.randn(3, 2))
    with torch.no_grad():
        dec.linear.weight.copy_(q * torch.tensor([1.5, 0.7]))
        dec.raw_log_std.fill_(0.0)
        w, b = dec.linear.weight, dec.linear.bias
        cov = torch.linalg.inv(torch.eye(2) + w.T @ w)  # diagonal because WᵀW is
        gain = cov @ w.T
        model.encoder.mean.weight.copy_(gain)
        model.encoder.mean.bias.copy_(-gain @ b + mean_shift)
        model.encoder.log_std.weight.zero_()
        log_std = 0.5 * torch.log(torch.diag(cov)) + math.log(std_scale)
        model.encoder.log_std.bias.copy_(8.0 * torch.atanh(log_std / 8.0))  # undo the encoder's soft clamp
    return model


@pytest.mark.parametrize("flow", [None, "iaf", "planar"])
def test_importance_weighted_nll_converges_to_exact_log_likelihood(flow):
    torch.manual_seed(0)
    posterior_flow = flows.build_flow(flow, 2, 2, 3, hidden=8) if flow else None
    if flow == "planar":
        # A mild planar map (|w| ~ 3, |u| ~ 0.4, so û stays small): with small random w the û
        # constraint adds (m(wᵀu) - wᵀu) w/‖w‖², large as w -> 0, and q's weights grow heavy-tailed
        # enough that K = 20,000 does not converge for some draws.
        with torch.no_grad():
            head = posterior_flow.params.head.bias.view(2, 5)  # step-major: u (2), w (2), b
            head[:, :2].normal_(0, 0.3)
            head[:, 2:4].normal_(0, 2.0)
    model = posterior_vae(posterior_flow, mean_shift=0.4, std_scale=1.4)
    x = torch.randn(5, 1, 1, 3) * 2
    exact = -model.decoder.marginal().log_prob(x.flatten(1))
    nll = objectives.importance_weighted_nll(model, x, samples=20_000, chunk_size=3000)
    assert nll.dtype == torch.float64 and nll.shape == (5,)
    torch.testing.assert_close(nll, exact, atol=0.03, rtol=0)  # the ELBO is >= 0.3 nats off (below)
    nll_few = objectives.importance_weighted_nll(model, x, samples=2, chunk_size=1)
    neg_elbo = objectives.negative_elbo(model(x, samples=20_000))
    assert (nll <= neg_elbo).all(), "the IW estimate must not be worse than the ELBO"
    assert (neg_elbo - exact > 0.3).all(), "q is deliberately imperfect; the ELBO gap must show"
    assert nll_few.mean() > nll.mean(), "the bound tightens as K grows"


def test_importance_weighted_nll_is_exact_for_the_true_posterior():
    """With q equal to the exact posterior every weight equals p(x): any K gives log p(x)."""
    torch.manual_seed(0)
    model = posterior_vae()
    x = torch.randn(6, 1, 1, 3)
    exact = -model.decoder.marginal().log_prob(x.flatten(1))
    torch.testing.assert_close(objectives.importance_weighted_nll(model, x, samples=3, chunk_size=2), exact)


def test_iwae_bound_and_bits_per_dim():
    model = linear_gaussian_vae()
    x = torch.randn(3, 1, 1, 3)
    ld = model(x, samples=7)
    manual = torch.log(torch.exp(ld.log_weight).mean(0))
    torch.testing.assert_close(objectives.iwae_bound(ld), manual)
    assert objectives.bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "name,kind,data",
    [
        ("bernoulli", "binary", torch.tensor([0.0, 1.0])),
        ("categorical256", "8bit", torch.arange(256, dtype=torch.uint8)),
        ("discretized_logistic", "8bit", torch.arange(256, dtype=torch.uint8)),
    ],
)
def test_discrete_likelihoods_are_normalized(name, kind, data):
    lik = build_likelihood(name, kind)
    torch.manual_seed(0)
    params = torch.randn(1, lik.params_per_pixel, 1, 1)
    if name == "discretized_logistic":
        params = torch.tensor([0.3, -2.0]).view(1, 2, 1, 1)
    x = data.view(-1, 1, 1, 1)
    total = torch.exp(lik.log_prob(params, lik.prepare(x))).sum()
    torch.testing.assert_close(total, torch.tensor(1.0), atol=1e-6, rtol=0)
    assert lik.mean(params).shape == (1, 1, 1, 1)


def test_likelihood_and_data_kind_must_agree():
    with pytest.raises(ValueError, match="cannot model 'binary'"):
        build_likelihood("categorical256", "binary")
    with pytest.raises(ValueError, match="unknown likelihood"):
        build_likelihood("poisson", "binary")


@pytest.mark.parametrize("arch", ["mlp", "conv", "gated"])
@pytest.mark.parametrize(
    "shape,likelihood,kind",
    [
        ((1, 28, 28), "bernoulli", "binary"),
        ((1, 28, 20), "categorical256", "8bit"),
        ((3, 32, 32), "discretized_logistic", "8bit"),
        ((1, 8, 8), "gaussian", "8bit"),
    ],
)
def test_architectures_fit_every_image_shape(arch, shape, likelihood, kind):
    torch.set_default_dtype(torch.float32)
    try:
        model = build_vae(
            arch,
            shape,
            6,
            likelihood,
            hidden=16,
            feature_dim=16,
            flow="iaf",
            flow_steps=1,
            flow_hidden=8,
            data_kind=kind,
        )
        x = torch.randint(0, 256 if kind == "8bit" else 2, (2, *shape))
        x = x.to(torch.uint8 if kind == "8bit" else torch.float32)
        ld = model(x, samples=3)
        assert ld.log_likelihood.shape == ld.log_prior.shape == ld.log_posterior.shape == (3, 2)
        assert torch.isfinite(ld.log_weight).all()
        assert model.sample(4).shape == (4, *shape)
        assert model.reconstruct(x).shape == (2, *shape)
        with pytest.raises(ValueError, match="expects images of shape"):
            model(torch.zeros(2, *shape[:-1], shape[-1] + 1))
    finally:
        torch.set_default_dtype(torch.float64)


def test_user_defined_encoder_and_decoder():
    torch.set_default_dtype(torch.float32)
    try:
        body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh())
        decoder = nn.Sequential(nn.Linear(4, 64), nn.Unflatten(1, (1, 8, 8)))
        model = VAE(
            GaussianEncoder(body, 32, 4),
            decoder,
            build_likelihood("bernoulli", "binary"),
            4,
            (1, 8, 8),
            flows.build_flow("sylvester-householder", 4, 2, context_dim=32, reflections=2),
        )
        x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.5))
        loss = objectives.negative_elbo(model(x)).mean()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize("flow", ["planar", "iaf", "sylvester-orthogonal"])
def test_flow_without_context_has_global_parameters(flow):
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        conditioned = build_vae("mlp", (1, 8, 8), 4, hidden=16, flow=flow, flow_steps=2, flow_hidden=8)
        global_ = build_vae("mlp", (1, 8, 8), 4, hidden=16, flow=flow, flow_steps=2, flow_hidden=8, flow_context=False)
        assert conditioned.flow.context_dim == 16 and global_.flow.context_dim is None
        assert count_parameters(global_.flow) < count_parameters(conditioned.flow)
        z0, h = torch.randn(5, 4), torch.randn(5, 16)
        assert torch.equal(global_.flow(z0)[0], global_.flow(z0, h)[0])  # global parameters: h is not read
        assert not torch.allclose(conditioned.flow(z0, h)[0], conditioned.flow(z0, h.flip(0))[0])
        x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.5))
        ld = global_(x, samples=2)
        assert torch.isfinite(ld.log_weight).all()
        objectives.negative_elbo(ld).mean().backward()
        assert all(p.grad is not None for p in global_.flow.parameters())
    finally:
        torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize(
    "params_shape, x_shape",
    [
        ((4, 3, 1, 2, 5), (3, 1, 2, 5)),
        ((3, 1, 2, 5), (3, 1, 2, 5)),
        ((2, 4, 3, 1, 2, 5), (3, 1, 2, 5)),
        ((4, 3, 1, 2, 5), (1, 2, 5)),
    ],
)
def test_bernoulli_log_prob_matches_torch_distributions_for_every_broadcast(params_shape, x_shape):
    torch.manual_seed(0)
    logits = torch.randn(params_shape, dtype=torch.float64) * 3
    x = torch.bernoulli(torch.full(x_shape, 0.4, dtype=torch.float64))
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x.expand(params_shape)).flatten(-3).sum(-1)
    torch.testing.assert_close(build_likelihood("bernoulli", "binary").log_prob(logits, x), expected)


def test_compiled_importance_sampling_matches_eager():
    from flowvae.evaluation import evaluate

    torch.manual_seed(0)
    model = build_vae("mlp", (1, 8, 8), 4, "bernoulli", hidden=16, flow="iaf", flow_steps=2, flow_hidden=16)
    x = torch.bernoulli(torch.full((10, 1, 8, 8), 0.3))
    eager = evaluate(model, x, batch_size=5, samples=40, chunk_size=16, seed=3)
    compiled = evaluate(model, x, batch_size=5, samples=40, chunk_size=16, seed=3, compile=True)
    assert compiled["nll"] == pytest.approx(eager["nll"], abs=1e-4)


def test_cpu_importance_sampling_chunks_stay_below_the_mmap_threshold_that_the_command_sets():
    import platform

    from flowvae.evaluation import MMAP_THRESHOLD_BYTES, auto_chunk_size, decode_budget, reuse_freed_memory

    glibc_linux = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert reuse_freed_memory() is glibc_linux
    for likelihood, shape, kind in (
        ("bernoulli", (1, 28, 28), "binary"),
        ("discretized_logistic", (3, 32, 32), "8bit"),
    ):
        model = build_vae("mlp", shape, 8, likelihood=likelihood, data_kind=kind)
        points, samples = auto_chunk_size(model, 100, 5000, decode_budget(torch.device("cpu")))
        output_bytes = points * samples * model.likelihood.params_per_pixel * math.prod(shape) * 4
        assert points * samples >= 1000 and output_bytes < MMAP_THRESHOLD_BYTES, (points, samples, output_bytes)


@pytest.mark.parametrize("chunk_size, points", [(1, None), (7, 2), (50, None), (123, 3), (1000, 5)])
def test_importance_weighted_estimate_does_not_depend_on_the_chunks(chunk_size, points):
    """The noise is drawn in fixed blocks for the whole batch, so memory-driven chunking (which
    differs between CPUs, GPUs and runs) cannot change the estimate."""
    model = posterior_vae(mean_shift=0.4, std_scale=1.4)
    x = torch.randn(7, 1, 1, 3)
    reference = objectives.importance_weighted_estimate(model, x, 333, 333, torch.Generator().manual_seed(3))
    other = objectives.importance_weighted_estimate(
        model, x, 333, chunk_size, torch.Generator().manual_seed(3), points=points
    )
    for name in ("nll", "mc_se", "ess"):
        torch.testing.assert_close(getattr(other, name), getattr(reference, name), rtol=1e-12, atol=1e-12)


def test_importance_weighted_standard_error_matches_the_spread_of_repeated_estimates():
    model = posterior_vae(mean_shift=0.4, std_scale=1.4)
    x = torch.randn(6, 1, 1, 3) * 2
    estimates = [
        objectives.importance_weighted_estimate(model, x, 100, 40, torch.Generator().manual_seed(seed))
        for seed in range(400)
    ]
    spread = torch.stack([e.nll for e in estimates]).std(0)
    predicted = torch.stack([e.mc_se for e in estimates]).mean(0)
    ratio = predicted / spread
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio  # 400 repeats: the spread itself is within ±8 %
    ess = torch.stack([e.ess for e in estimates])
    assert ((ess > 1) & (ess < 100)).all()


def test_importance_weighted_estimate_of_the_true_posterior_has_no_error():
    """Equal weights: ESS = K and a zero standard error."""
    model = posterior_vae()
    estimate = objectives.importance_weighted_estimate(model, torch.randn(4, 1, 1, 3), 64, 10)
    torch.testing.assert_close(estimate.ess, torch.full((4,), 64.0, dtype=torch.float64))
    assert (estimate.mc_se < 1e-6).all()


def test_evaluate_reports_the_standard_errors_and_the_effective_sample_size():
    from flowvae.evaluation import evaluate
    from flowvae.models.base import draw_noise

    model = posterior_vae(mean_shift=0.4, std_scale=1.4)
    x = torch.randn(20, 1, 1, 3) * 2
    results = evaluate(model, x, batch_size=20, samples=50, seed=5)
    generator = torch.Generator().manual_seed(5 * 1_000_003)  # batch 0's generator
    neg_elbo = objectives.negative_elbo(model(x, noise=draw_noise(model, 1, 20, generator=generator)))
    estimate = objectives.importance_weighted_estimate(model, x, 50, 50, generator)
    assert results["nll"] == pytest.approx(estimate.nll.mean().item(), rel=1e-6)
    assert results["nll_mc_se"] == pytest.approx(estimate.mc_se.square().sum().sqrt().item() / 20, rel=1e-6)
    assert results["nll_ess"] == pytest.approx(estimate.ess.mean().item(), rel=1e-6)
    assert results["nll_data_se"] == pytest.approx(estimate.nll.std().item() / math.sqrt(20), rel=1e-6)
    assert results["neg_elbo_data_se"] == pytest.approx(neg_elbo.std().item() / math.sqrt(20), rel=1e-6)
