"""Priors: normalisation by quadrature, log-dets against autograd Jacobians, sampling against
maximum-likelihood fits, the VampPrior against naive mixtures, and the importance-weighted
estimator with a flow prior against the exact marginal likelihood of a linear-Gaussian model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from flowvae import flows as F
from flowvae.distributions import diagonal_gaussian, standard_normal_log_prob
from flowvae.priors import (
    FLOW_PRIOR_NAMES,
    PRIOR_NAMES,
    FlowPrior,
    Prior,
    StandardNormalPrior,
    VampPrior,
    build_flow_prior,
    build_prior,
    gaussian_mixture_log_prob,
    has_one_pass_density,
)

torch.set_num_threads(1)
IMAGE = (1, 2, 2)


def perturb(module: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Add ``scale`` · N(0, 1) to every parameter, so that no test passes by sitting at the identity."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


class LinearEncoder:
    """A random linear Gaussian encoder u (K, *IMAGE) -> (mean (K, D), log_std (K, D)), as a model's would be."""

    def __init__(self, dim: int, spread: float = 3.0, seed: int = 0, dtype=torch.float64) -> None:
        g = torch.Generator().manual_seed(seed)
        n = math.prod(IMAGE)
        self.w_mean = spread * torch.randn(n, dim, generator=g, dtype=dtype)
        self.b_mean = torch.randn(dim, generator=g, dtype=dtype)
        self.w_log_std = torch.randn(n, dim, generator=g, dtype=dtype)

    def __call__(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = u.flatten(1)
        return flat @ self.w_mean + self.b_mean - self.w_mean.sum(0) / 2, 0.5 * torch.tanh(flat @ self.w_log_std) - 0.4


def vamp(n_pseudo: int, dim: int, seed: int = 0, **kwargs) -> VampPrior:
    torch.manual_seed(seed)
    return VampPrior(n_pseudo, IMAGE, LinearEncoder(dim, seed=seed, **kwargs), latent_dim=dim).double()


def flow_prior(family: str, event_shape=(2,), scale: float = 0.3, seed: int = 0) -> FlowPrior:
    torch.manual_seed(seed)
    prior = build_flow_prior(event_shape, family, steps=2, hidden=16).double()
    perturb(prior, scale, seed)
    return prior


PRIORS_2D = {
    "standard": lambda: StandardNormalPrior((2,)).double(),
    "flow-maf": lambda: flow_prior("maf", scale=0.12),
    "flow-coupling": lambda: flow_prior("coupling", scale=0.5),
    "vamp": lambda: vamp(6, 2),
}


@pytest.mark.parametrize("name", PRIORS_2D)
def test_log_prob_integrates_to_one_in_2d(name):
    prior = PRIORS_2D[name]()
    step = 0.04
    axis = torch.arange(-10.0, 10.0 + step / 2, step, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)  # (n, n, 2)
    with torch.no_grad():
        density = torch.exp(prior.log_prob(grid))
    assert density.shape == grid.shape[:2] and density.dtype == torch.float64
    edge = torch.cat([density[0], density[-1], density[:, 0], density[:, -1]]).max()
    assert edge < 1e-8, "the grid should hold all the mass"
    assert abs(density.sum().item() * step**2 - 1.0) < 1e-3
    # the samples follow the same density: their mean and covariance match the quadrature's
    mass = density / density.sum()
    mean = (mass[..., None] * grid).sum((0, 1))
    centred = grid - mean
    cov = (mass[..., None, None] * centred[..., :, None] * centred[..., None, :]).sum((0, 1))
    z = prior.sample(20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), mean, rtol=0, atol=4 * cov.diagonal().max().sqrt().item() / math.sqrt(20000))
    torch.testing.assert_close(torch.cov(z.T), cov, rtol=0.05, atol=0.03)


JACOBIAN_CASES = [("maf", (3,)), ("coupling", (3,)), ("glow", (2, 2, 2))]


@pytest.mark.parametrize("family,event_shape", JACOBIAN_CASES, ids=[c[0] for c in JACOBIAN_CASES])
def test_flow_prior_is_base_density_plus_autograd_log_det(family, event_shape):
    prior = flow_prior(family, event_shape)
    z = torch.randn(3, *event_shape, dtype=torch.float64)
    log_p = prior.log_prob(z)
    assert log_p.shape == (3,)
    for i in range(3):

        def to_base(x):
            return prior.flow.inverse(x.view(1, *event_shape))[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(to_base, z[i].reshape(-1), vectorize=True)
        expected = standard_normal_log_prob(to_base(z[i].reshape(-1))) + torch.linalg.slogdet(jac).logabsdet
        torch.testing.assert_close(log_p[i], expected, rtol=1e-10, atol=1e-10)


def test_maf_prior_fit_by_maximum_likelihood_samples_the_target():
    torch.manual_seed(0)
    mean = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[2.0, 1.2], [1.2, 1.5]])
    target = D.MultivariateNormal(mean, cov)
    prior = build_flow_prior((2,), "maf", steps=2, hidden=16)
    optimizer = torch.optim.Adam(prior.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 300)
    for _ in range(300):
        loss = -prior.log_prob(target.sample((512,))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    held_out = target.sample((20000,))
    with torch.no_grad():
        assert abs(prior.log_prob(held_out).mean() - target.log_prob(held_out).mean()) < 0.01
    z = prior.sample(20000, generator=torch.Generator().manual_seed(1))
    assert z.shape == (20000, 2) and not z.requires_grad
    torch.testing.assert_close(z.mean(0), mean, rtol=0, atol=0.06)
    torch.testing.assert_close(torch.cov(z.T), cov, rtol=0, atol=0.1)
    with torch.no_grad():
        assert torch.isfinite(prior.log_prob(z)).all()


def test_vamp_prior_with_one_pseudo_input_is_that_posterior():
    prior = vamp(1, 3)
    mean, log_std = prior.components()
    z = torch.randn(4, 5, 3, dtype=torch.float64)
    expected = diagonal_gaussian(mean[0], log_std[0]).log_prob(z)
    torch.testing.assert_close(prior.log_prob(z), expected, rtol=1e-12, atol=1e-12)


def naive_mixture(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log (1/K) Σ_k N(z; μ_k, σ_k²) from the (..., K, D) differences, in float64."""
    z, mean, log_std = z.double(), mean.double(), log_std.double()
    per_component = D.Normal(mean, log_std.exp()).log_prob(z.unsqueeze(-2)).sum(-1)
    return torch.logsumexp(per_component, -1) - math.log(mean.shape[0])


def test_vamp_prior_equals_the_explicit_mixture():
    prior = vamp(7, 3)
    z = 2.0 * torch.randn(6, 5, 3, dtype=torch.float64)
    mean, log_std = prior.components()
    log_p = prior.log_prob(z)
    assert log_p.shape == (6, 5)
    torch.testing.assert_close(log_p, naive_mixture(z, mean, log_std), rtol=1e-12, atol=1e-10)
    # rows taken a few at a time give the same answer
    torch.testing.assert_close(gaussian_mixture_log_prob(z, mean, log_std, max_block=20), log_p, rtol=0, atol=1e-12)


def test_mixture_stays_exact_for_float32_with_spread_out_narrow_components():
    # The expanded quadratic form has terms ~‖z − c‖²/σ² ≈ 1e7 here: in float32 it would lose ~1 nat.
    g = torch.Generator().manual_seed(0)
    mean = 20.0 * torch.randn(20, 8, generator=g)
    log_std = torch.full((20, 8), -4.0) + 0.1 * torch.randn(20, 8, generator=g)
    z = mean[:5] + 0.02 * torch.randn(5, 8, generator=g)
    log_p = gaussian_mixture_log_prob(z, mean, log_std)
    assert log_p.dtype == torch.float32
    torch.testing.assert_close(log_p.double(), naive_mixture(z, mean, log_std), rtol=1e-6, atol=1e-4)


def test_vamp_prior_learns_pseudo_inputs_only_and_keeps_the_encoder_outside():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(IMAGE), 6))
    prior = VampPrior(5, IMAGE, lambda u: encoder(u).chunk(2, -1), latent_dim=3)
    assert set(prior.state_dict()) == {"pseudo_logits"}
    assert [name for name, _ in prior.named_parameters()] == ["pseudo_logits"]
    u = prior.pseudo_inputs
    assert u.shape == (5, *IMAGE) and (u > 0).all() and (u < 1).all()
    prior.log_prob(torch.randn(4, 3)).sum().backward()
    assert prior.pseudo_logits.grad.abs().sum() > 0 and encoder[1].weight.grad.abs().sum() > 0
    assert torch.isfinite(prior.sample(11)).all() and prior.sample(11).shape == (11, 3)
    init = torch.rand(5, *IMAGE)
    torch.testing.assert_close(
        VampPrior(5, IMAGE, lambda u: encoder(u).chunk(2, -1), init, latent_dim=3).pseudo_inputs,
        init.clamp(1e-3, 1 - 1e-3),
    )


def test_vamp_prior_samples_follow_the_mixture():
    prior = vamp(3, 2)
    mean, log_std = prior.components()
    z = prior.sample(30000, generator=torch.Generator().manual_seed(0))
    mixture_mean = mean.mean(0)
    mixture_cov = torch.diag((log_std.exp() ** 2).mean(0)) + torch.cov(mean.T, correction=0)
    torch.testing.assert_close(z.mean(0), mixture_mean, rtol=0, atol=0.1)
    torch.testing.assert_close(torch.cov(z.T), mixture_cov, rtol=0.05, atol=0.1)


def test_spatial_flow_prior_round_trips():
    prior = flow_prior("glow", (4, 4, 4), scale=0.2)
    assert len(prior.flow) == 6  # ActNorm, 1x1 conv, coupling per step
    z = prior.sample(6, generator=torch.Generator().manual_seed(0))
    assert z.shape == (6, 4, 4, 4) and z.dtype == torch.float64
    log_p = prior.log_prob(z)
    assert log_p.shape == (6,) and torch.isfinite(log_p).all()
    u = torch.randn(6, 4, 4, 4, dtype=torch.float64)
    z, log_abs_det = prior.flow(u)  # sampling direction
    torch.testing.assert_close(
        prior.log_prob(z), standard_normal_log_prob(u.flatten(1)) - log_abs_det, rtol=1e-10, atol=1e-9
    )
    torch.testing.assert_close(
        prior.sample(3, torch.Generator().manual_seed(5)), prior.sample(3, torch.Generator().manual_seed(5))
    )


class LinearFlow(F.Flow):
    """Test-only flow z = A u with a fixed invertible A; log|det| = log|det A|."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, z, context=None):
        return z @ self.matrix.T, torch.linalg.slogdet(self.matrix).logabsdet.expand(z.shape[:-1])

    def inverse(self, z, context=None):
        return torch.linalg.solve(self.matrix, z.unsqueeze(-1)).squeeze(-1), -torch.linalg.slogdet(
            self.matrix
        ).logabsdet.expand(z.shape[:-1])


def test_importance_weighted_estimate_with_flow_prior_converges_to_exact_log_marginal():
    # x = W z + σ ε,  z = A u,  u ~ N(0, I):  p(x) = N(x; 0, W A Aᵀ Wᵀ + σ² I)
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([[1.5, 0.3], [-0.4, 0.8]], dtype=torch.float64)
    w = torch.randn(3, 2, generator=g, dtype=torch.float64)
    sigma = 0.5
    prior = FlowPrior((2,), LinearFlow(a))
    prior_cov = a @ a.T
    marginal_cov = w @ prior_cov @ w.T + sigma**2 * torch.eye(3, dtype=torch.float64)
    marginal = D.MultivariateNormal(torch.zeros(3, dtype=torch.float64), marginal_cov)
    x = marginal.sample((4,))  # (B, 3)
    exact = marginal.log_prob(x)

    post_cov = torch.linalg.inv(torch.linalg.inv(prior_cov) + w.T @ w / sigma**2)
    post_mean = x @ w @ post_cov / sigma**2  # (B, 2)

    def log_weights(q: D.Distribution, samples: int) -> torch.Tensor:
        z = q.sample((samples,))  # (K, B, 2)
        log_lik = D.Normal(z @ w.T, sigma).log_prob(x).sum(-1)
        return log_lik + prior.log_prob(z) - q.log_prob(z)  # (K, B)

    torch.manual_seed(1)
    exact_posterior = D.MultivariateNormal(post_mean, post_cov)
    torch.testing.assert_close(log_weights(exact_posterior, 16), exact.expand(16, 4), rtol=1e-10, atol=1e-10)

    shift = 0.3 * torch.diagonal(post_cov).sqrt() * torch.tensor([1.0, -1.0], dtype=torch.float64)
    wrong = D.MultivariateNormal(post_mean + shift, 1.3 * post_cov)  # slightly off-centre and too wide
    k = 20000
    log_w = log_weights(wrong, k)
    estimate = torch.logsumexp(log_w, 0) - math.log(k)
    elbo = log_w.mean(0)
    iwae_10 = (torch.logsumexp(log_w.view(10, -1, 4), 0) - math.log(10)).mean(0)
    weights = torch.exp(log_w - log_w.max(0).values)
    standard_error = weights.std(0) / weights.mean(0) / math.sqrt(k)  # of the log-mean by the delta method
    assert standard_error.max() < 0.005
    assert ((estimate - exact).abs() < 4 * standard_error).all()
    assert (elbo < iwae_10).all() and (iwae_10 < exact).all()
    gap = D.kl_divergence(wrong, exact_posterior)  # ELBO = log p(x) − KL(q ‖ p(z|x))
    assert (gap > 0.05).all()
    torch.testing.assert_close(elbo, exact - gap, rtol=0, atol=4 * log_w.std(0).max().item() / math.sqrt(k))


def test_standard_prior_is_unit_gaussian_over_any_event_shape():
    prior = StandardNormalPrior((2, 3, 3))
    z = torch.randn(5, 4, 2, 3, 3)
    torch.testing.assert_close(prior.log_prob(z), D.Normal(0.0, 1.0).log_prob(z).sum((-3, -2, -1)))
    assert prior.closed_form_kl and not flow_prior("maf").closed_form_kl and not vamp(2, 2).closed_form_kl
    assert dict(prior.state_dict()) == {} and build_prior("standard", 4).event_shape == (4,)
    assert isinstance(prior, Prior) and prior.sample(7).shape == (7, 2, 3, 3)


@pytest.mark.parametrize("name", ["standard", "flow", "vamp"])
def test_priors_follow_device_and_dtype_and_score_in_float32(name, device):
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(IMAGE), 4))
    prior = build_prior(
        name, (2,), steps=2, hidden=8, n_pseudo=3, image_shape=IMAGE, encode=lambda u: encoder(u).chunk(2, -1)
    )
    encoder.to(device)
    prior.to(device)
    z = torch.randn(3, 2, device=device)
    log_p = prior.log_prob(z)
    assert log_p.shape == (3,) and log_p.dtype == torch.float32 and log_p.device == z.device
    half = prior.log_prob(z.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, prior.log_prob(z.bfloat16().float()))
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        torch.testing.assert_close(prior.log_prob(z), log_p)
    sample = prior.sample(4)
    assert sample.device == z.device and sample.dtype == torch.float32
    encoder.double()
    assert prior.double().sample(4).dtype == torch.float64


def test_one_pass_density_rule():
    assert has_one_pass_density(F.MAF(3, (8,))) and has_one_pass_density(F.AffineCoupling(3, 8))
    assert has_one_pass_density(F.Inverse(F.IAF(3, (8,))))  # IAF's forward is one pass
    assert not has_one_pass_density(F.IAF(3, (8,))) and not has_one_pass_density(F.Planar(3))
    assert not has_one_pass_density(F.Compose(F.MAF(3, (8,)), F.Reverse(3), F.IAF(3, (8,))))
    assert not has_one_pass_density(F.Inverse(F.MAF(3, (8,))))
    assert FLOW_PRIOR_NAMES == ("maf", "coupling", "glow") and PRIOR_NAMES == ("standard", "flow", "vamp")


def encode2(u):
    return u.flatten(1)[:, :2], u.flatten(1)[:, 2:4]


BAD = [
    (lambda: build_prior("gaussian", (2,)), "unknown prior 'gaussian'"),
    (lambda: build_prior("vamp", (2,)), "needs image_shape and encode"),
    (lambda: build_prior("vamp", (2, 2, 2), image_shape=IMAGE, encode=encode2), "vector latents"),
    (lambda: build_prior("standard", (0,)), "positive ints"),
    (lambda: build_flow_prior((3,), "iaf"), "one of maf, coupling, glow"),
    (lambda: build_flow_prior((3,), "glow"), "does not fit event_shape"),
    (lambda: build_flow_prior((4, 2, 2), "maf"), "does not fit event_shape"),
    (lambda: build_flow_prior((2, 2)), r"\(D,\) or \(C, H, W\)"),
    (lambda: build_flow_prior((3,), steps=0), "steps >= 1"),
    (lambda: build_flow_prior((1,), "coupling"), "at least 2"),
    (lambda: FlowPrior((3,), F.IAF(3, (8,))), "IAF is not"),
    (lambda: FlowPrior((3,), F.Compose(F.MAF(3, (8,)), F.Planar(3))), "Planar is not"),
    (lambda: FlowPrior((3,), F.MAF(3, (8,), context_dim=2)), "unconditional"),
    (lambda: FlowPrior((2, 2, 2), F.MAF(3, (8,))), "event_dim 3"),
    (lambda: StandardNormalPrior((3,)).log_prob(torch.zeros(4, 2)), r"expects z of shape \(\*batch, 3\)"),
    (lambda: VampPrior(0, IMAGE, encode2, latent_dim=2), "n_pseudo >= 1"),
    (lambda: VampPrior(2, IMAGE, encode2, torch.rand(3, *IMAGE), latent_dim=2), "pseudo_init must be"),
    (lambda: VampPrior(2, IMAGE, encode2, 2 * torch.ones(2, *IMAGE), latent_dim=2), r"in \[0, 1\]"),
    (lambda: VampPrior(2, IMAGE, encode2, latent_dim=3).log_prob(torch.zeros(1, 3)), r"shape \(2, 3\)"),
    (lambda: StandardNormalPrior((3,)).sample(-1), "n >= 0"),
]


@pytest.mark.parametrize("make,message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_raise_one_line_errors(make, message):
    with pytest.raises(ValueError, match=message) as info:
        make()
    assert "\n" not in str(info.value)
