"""flowvae speaks torch.distributions: FlowDistribution and StandardNormal as Distributions, flowvae
flows as Transforms (TransformedDistribution, Pyro SVI), and torch/Pyro/zuko transforms as flowvae flows
(log-dets against autograd Jacobians in float64, a zuko spline posterior in a VAE on digits)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D
from torch import nn

from flowvae import flows as F
from flowvae import objectives
from flowvae.distributions import FlowDistribution, StandardNormal, diagonal_gaussian

DIM, CTX, BATCH = 4, 3, 5
f64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(flow: F.Flow, seed: int = 0) -> F.Flow:
    """``flow`` in float64 with every parameter moved off its near-identity initialisation."""
    torch.manual_seed(seed)
    flow = flow.to(f64)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def posterior(flow: F.Flow | None, seed: int = 1, validate_args: bool | None = None) -> FlowDistribution:
    """q(z|x) over (BATCH, DIM) as the VAE builds it: diagonal Gaussian base, flow conditioned on h."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(BATCH, DIM, generator=g, dtype=f64)
    log_std = 0.3 * torch.randn(BATCH, DIM, generator=g, dtype=f64)
    h = torch.randn(BATCH, CTX, generator=g, dtype=f64)
    return FlowDistribution(diagonal_gaussian(mean, log_std), flow, h, validate_args=validate_args)


INVERTIBLE = ["iaf", "maf", "coupling", "radial", "householder"]


def invertible_flow(name: str) -> F.Flow:
    return perturbed(F.build_flow(name, DIM, 2, context_dim=CTX, hidden=12, reflections=2))


# --- StandardNormal -------------------------------------------------------------------------------


def test_standard_normal_is_a_distribution_that_moves_with_the_model():
    base = StandardNormal(DIM, batch_shape=(2,)).double()
    assert isinstance(base, D.Distribution) and isinstance(base, nn.Module)
    assert base.batch_shape == (2,) and base.event_shape == (DIM,) and base.has_rsample
    z = base.sample((3,))
    assert z.shape == (3, 2, DIM) and z.dtype == f64
    reference = D.Independent(D.Normal(torch.zeros(2, DIM, dtype=f64), 1.0), 1)
    torch.testing.assert_close(base.log_prob(z), reference.log_prob(z))
    torch.testing.assert_close(base.entropy(), reference.entropy())
    torch.testing.assert_close(
        base.log_prob(torch.zeros(DIM, dtype=f64)), torch.full((2,), -0.5 * DIM * math.log(2 * math.pi), dtype=f64)
    )
    wide = base.expand((4, 2))
    assert wide.rsample().shape == (4, 2, DIM) and wide.loc.dtype == f64 and wide.mean.shape == (4, 2, DIM)


def test_standard_normal_validates_values_when_asked():
    base = StandardNormal(DIM, validate_args=True)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        base.log_prob(torch.zeros(3, DIM + 1))
    with pytest.raises(ValueError, match="support"):
        base.log_prob(torch.full((DIM,), float("nan")))
    assert torch.isnan(StandardNormal(DIM, validate_args=False).log_prob(torch.full((DIM,), float("nan"))))
    with pytest.raises(ValueError, match="positive integer"):
        StandardNormal(0)


# --- FlowDistribution as a Distribution ------------------------------------------------------------


def test_flow_distribution_has_the_distribution_api_shapes_and_gradients():
    q = posterior(invertible_flow("iaf"))
    assert isinstance(q, D.Distribution) and q.has_rsample
    assert q.batch_shape == (BATCH,) and q.event_shape == (DIM,) and q.support.event_dim == 1
    z = q.rsample((7,))
    assert z.shape == (7, BATCH, DIM) and z.requires_grad
    assert q.log_prob(z).shape == (7, BATCH)
    mean = q.base.base_dist.loc.requires_grad_()
    z = FlowDistribution(q.base, q.flow, q.context).rsample()
    z.sum().backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0  # reparameterized through the flow
    s = q.sample((2,))
    assert s.shape == (2, BATCH, DIM) and not s.requires_grad


@pytest.mark.parametrize("name", ["none", *INVERTIBLE])
def test_log_prob_of_rsample_equals_the_fused_path(name):
    q = posterior(None if name == "none" else invertible_flow(name))
    torch.manual_seed(3)
    z_fused, log_q = q.rsample_and_log_prob((6,))
    torch.manual_seed(3)
    z = q.rsample((6,))
    torch.testing.assert_close(z, z_fused, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.log_prob(z), log_q, rtol=0, atol=1e-10)  # reused log-det
    torch.testing.assert_close(q.log_prob(z.clone()), log_q, rtol=0, atol=1e-10)  # through flow.inverse


@pytest.mark.parametrize("sample_shape", [(1,), (1, 1), (2,)])
def test_one_draw_runs_the_flow_without_the_sample_dimension_and_gives_the_same_numbers(sample_shape):
    q = posterior(invertible_flow("iaf"))
    noise = torch.randn(*sample_shape, BATCH, DIM, dtype=f64)
    z0 = q.base.mean + q.base.stddev * noise
    seen = []
    hook = q.flow.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    z, log_q = q.rsample_and_log_prob(sample_shape, noise)
    hook.remove()
    z_ref, ladj = q.flow(z0, q.context)  # h broadcast against the sample dimensions
    assert seen == [(BATCH, DIM) if sample_shape != (2,) else (2, BATCH, DIM)]
    assert z.shape == z0.shape and log_q.shape == (*sample_shape, BATCH)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_q, q.base.log_prob(z0) - ladj, rtol=0, atol=1e-12)


def test_log_prob_reuses_a_log_det_only_for_the_identical_unmodified_sample():
    flow = perturbed(F.build_flow("planar", DIM, 3, context_dim=CTX))  # no inverse: only the cache can score
    q = posterior(flow)
    torch.manual_seed(4)
    _, log_q = q.rsample_and_log_prob((2,))
    torch.manual_seed(4)
    z = q.rsample((2,))
    torch.testing.assert_close(q.log_prob(z), log_q, rtol=0, atol=1e-10)
    with pytest.raises(NotImplementedError, match="no inverse"):
        q.log_prob(z.detach().clone())  # same values, another tensor: not taken from the cache
    z2 = q.rsample((2,))
    with pytest.raises(NotImplementedError, match="no inverse"):
        q.log_prob(z)  # the cache holds the last draw only
    q.log_prob(z2)
    with torch.no_grad():
        next(flow.parameters()).add_(0.1)  # an optimizer step changes the density of z2
    with pytest.raises(NotImplementedError, match="no inverse"):
        q.log_prob(z2)
    z3 = q.sample()
    with torch.no_grad():
        z3.add_(1.0)  # edited in place: no longer the sample drawn
    with pytest.raises(NotImplementedError, match="no inverse"):
        q.log_prob(z3)


def test_flow_distribution_validates_values_and_arguments():
    q = posterior(invertible_flow("iaf"), validate_args=True)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        q.log_prob(torch.zeros(BATCH, DIM + 1, dtype=f64))
    with pytest.raises(ValueError, match="broadcast"):
        q.log_prob(torch.zeros(BATCH + 1, DIM, dtype=f64))
    with pytest.raises(ValueError, match="support"):
        q.log_prob(torch.full((BATCH, DIM), float("nan"), dtype=f64))
    with pytest.raises(ValueError, match="tensor"):
        q.log_prob([0.0] * DIM)
    off = posterior(invertible_flow("iaf"), validate_args=False)
    assert torch.isnan(off.log_prob(torch.full((BATCH, DIM), float("nan"), dtype=f64))).all()
    with pytest.raises(ValueError, match="event_dim"):
        FlowDistribution(D.Normal(torch.zeros(BATCH, DIM), 1.0), F.Planar(DIM))
    with pytest.raises(TypeError, match="Distribution"):
        FlowDistribution(torch.zeros(DIM), F.Planar(DIM))
    with pytest.raises(ValueError, match="context"):
        FlowDistribution(q.base, q.flow, None).rsample()  # the flow checks h itself, when it runs


def test_expand_broadcasts_the_base_and_keeps_the_flow():
    q = posterior(invertible_flow("coupling"))
    wide = q.expand((3, BATCH))
    assert wide.batch_shape == (3, BATCH) and wide.event_shape == (DIM,)
    z = q.rsample((2,))
    assert wide.rsample((2,)).shape == (2, 3, BATCH, DIM)
    torch.testing.assert_close(wide.log_prob(z[:, None].clone()), q.log_prob(z.clone())[:, None].expand(2, 3, BATCH))


# --- flowvae flows as torch Transforms -------------------------------------------------------------


@pytest.mark.parametrize("name", INVERTIBLE)
def test_transformed_distribution_of_a_flow_agrees_with_flow_distribution_in_float64(name):
    q = posterior(invertible_flow(name))
    transformed = D.TransformedDistribution(q.base, [F.as_transform(q.flow, q.context)])
    assert transformed.batch_shape == q.batch_shape and transformed.event_shape == q.event_shape
    torch.manual_seed(5)
    z, log_q = q.rsample_and_log_prob((3,))
    torch.manual_seed(5)
    y = transformed.rsample((3,))
    torch.testing.assert_close(y, z, rtol=0, atol=1e-12)
    torch.testing.assert_close(transformed.log_prob(y), log_q, rtol=0, atol=1e-10)  # cached log-det
    torch.testing.assert_close(transformed.log_prob(z.clone()), log_q, rtol=0, atol=1e-10)  # flow.inverse
    other = q.base.sample((3,)) * 2.0
    torch.testing.assert_close(transformed.log_prob(other), q.log_prob(other.clone()), rtol=0, atol=1e-10)


def test_as_transform_reuses_a_log_det_only_for_the_identical_unmodified_input():
    flow = perturbed(F.build_flow("iaf", DIM, 2, hidden=8))
    calls = []
    flow.register_forward_pre_hook(lambda *_: calls.append(1))
    t = F.as_transform(flow)
    assert t.bijective and t.domain.event_dim == 1 and t.codomain.event_dim == 1
    x = torch.randn(BATCH, DIM, dtype=f64)
    y = t(x)
    ladj = t.log_abs_det_jacobian(x, y)
    assert len(calls) == 1 and ladj.shape == (BATCH,)
    assert t.inv(y) is x and len(calls) == 1  # the inverse of the value just produced
    torch.testing.assert_close(t.log_abs_det_jacobian(x.clone(), y), ladj)
    assert len(calls) == 2  # another tensor: recomputed, same value
    with torch.no_grad():
        x.mul_(2.0)
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), flow(x, None)[1])  # edited in place: recomputed
    assert len(calls) == 4 and not torch.allclose(flow(x, None)[1], ladj)
    uncached = F.as_transform(flow, cache_size=0)
    calls.clear()
    uncached.log_abs_det_jacobian(x, uncached(x))
    assert len(calls) == 2


def test_as_transform_scores_its_own_samples_without_an_inverse_and_refuses_others():
    flow = perturbed(F.build_flow("planar", DIM, 2, context_dim=CTX))
    q = posterior(flow)
    transformed = D.TransformedDistribution(q.base, [F.as_transform(flow, q.context)])
    torch.manual_seed(6)
    _, log_q = q.rsample_and_log_prob()
    torch.manual_seed(6)
    y = transformed.rsample()
    torch.testing.assert_close(transformed.log_prob(y), log_q, rtol=0, atol=1e-10)
    with pytest.raises(NotImplementedError, match="no inverse"):
        transformed.log_prob(y.clone())
    with pytest.raises(ValueError, match="needs context"):
        F.as_transform(flow)
    with pytest.raises(TypeError, match="Flow"):
        F.as_transform(nn.Linear(DIM, DIM))


def test_pyro_svi_with_a_conditioned_flowvae_flow_guide_lowers_the_loss():
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    data = torch.tensor([3.0, -2.0]) + 0.5 * torch.randn(10, 2)

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=data)

    encoder = nn.Linear(2, CTX)  # h from the data: the IAF step reads it; planar has no inverse
    flow = F.Compose(F.IAF(2, (16, 16), context_dim=CTX), F.Planar(2), F.IAF(2, (16, 16), CTX, "reversed"), F.Planar(2))
    calls = []
    flow.register_forward_pre_hook(lambda *_: calls.append(1))

    def guide():
        pyro.module("encoder", encoder)
        pyro.module("flow", flow)
        loc, log_scale = pyro.param("loc", torch.zeros(2)), pyro.param("log_scale", torch.zeros(2))
        h = encoder(data.mean(0))
        pyro.sample(
            "z", dist.TransformedDistribution(dist.Normal(loc, log_scale.exp()).to_event(1), [F.as_transform(flow, h)])
        )

    estimate = Trace_ELBO(num_particles=64, vectorize_particles=True)
    before = estimate.loss(model, guide)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    calls.clear()
    for _ in range(60):
        svi.step()
    assert len(calls) == 60  # one flow pass per step: the guide's log q reuses the sampling log-det
    after = estimate.loss(model, guide)
    assert math.isfinite(after) and after < 0.5 * before


# --- torch / Pyro / zuko transforms as flowvae flows -----------------------------------------------


def _sources():
    zuko = pytest.importorskip("zuko")
    pytest.importorskip("pyro")
    import pyro.distributions.transforms as T

    return {
        "zuko-nsf-context": (zuko.flows.NSF(DIM, context=CTX, transforms=2, hidden_features=(16, 16)).transform, CTX),
        "zuko-nsf": (zuko.flows.NSF(DIM, transforms=2, hidden_features=(16, 16)).transform, None),
        "pyro-spline-elementwise": (T.Spline(DIM, count_bins=4), None),
        "pyro-conditional-spline-autoregressive": (
            T.conditional_spline_autoregressive(DIM, CTX, hidden_dims=[8, 8]),
            CTX,
        ),
        "torch-affine": (
            D.AffineTransform(torch.zeros(DIM, dtype=f64), torch.linspace(0.5, 2.0, DIM, dtype=f64)),
            None,
        ),
    }


SOURCES = [
    "zuko-nsf-context",
    "zuko-nsf",
    "pyro-spline-elementwise",
    "pyro-conditional-spline-autoregressive",
    "torch-affine",
]


@pytest.mark.parametrize("name", SOURCES)
def test_from_transform_log_det_matches_the_autograd_jacobian_and_inverts(name):
    source, context_dim = _sources()[name]
    flow = F.from_transform(source, context_dim=context_dim, features=DIM)
    if isinstance(source, nn.Module):
        perturbed(flow)
    g = torch.Generator().manual_seed(7)
    z = 1.5 * torch.randn(3, BATCH, DIM, generator=g, dtype=f64)
    h = torch.randn(BATCH, CTX, generator=g, dtype=f64)
    y, ladj = flow(z, h)
    assert y.shape == z.shape and ladj.shape == (3, BATCH)
    for k, b in [(0, 0), (2, 3)]:
        jacobian = torch.autograd.functional.jacobian(lambda v, b=b: flow(v, h[b])[0], z[k, b])
        torch.testing.assert_close(ladj[k, b], torch.linalg.slogdet(jacobian)[1], rtol=0, atol=1e-8)
    assert flow.has_inverse
    back, ladj_inverse = flow.inverse(y, h)
    torch.testing.assert_close(back, z, rtol=0, atol=1e-7)
    torch.testing.assert_close(ladj_inverse, -ladj, rtol=0, atol=1e-7)
    q = FlowDistribution(posterior(None).base, flow, h)  # and it is a posterior flow like any other
    z_k, log_q = q.rsample_and_log_prob((2,))
    torch.testing.assert_close(q.log_prob(z_k.clone()), log_q, rtol=0, atol=1e-7)


def test_from_transform_gives_clear_errors():
    zuko = pytest.importorskip("zuko")
    pytest.importorskip("pyro")
    import pyro.distributions.transforms as T

    with pytest.raises(ValueError, match="context_dim must be None"):
        F.from_transform(D.ExpTransform(), context_dim=CTX)
    with pytest.raises(ValueError, match="context_dim=H"):
        F.from_transform(T.conditional_spline_autoregressive(DIM, CTX))
    with pytest.raises(TypeError, match="Transform"):
        F.from_transform(3.0)
    nsf = zuko.flows.NSF(DIM, context=CTX, transforms=1)
    conditional = F.from_transform(nsf.transform, context_dim=CTX, features=DIM)
    with pytest.raises(ValueError, match="needs context"):
        conditional(torch.randn(BATCH, DIM))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        conditional(torch.randn(BATCH, DIM + 1), torch.randn(BATCH, CTX))
    with pytest.raises(TypeError, match="flow.transform"):
        F.from_transform(nsf, context_dim=CTX)(torch.randn(BATCH, DIM), torch.randn(BATCH, CTX))


def test_vae_with_a_zuko_spline_posterior_trains_on_digits():
    zuko = pytest.importorskip("zuko")
    from flowvae.data import load_dataset
    from flowvae.models import VAE, GaussianEncoder, build_likelihood

    torch.manual_seed(0)
    digits = load_dataset("digits")
    latent, hidden = 8, 64
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ELU())
    decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ELU(), nn.Linear(hidden, 64), nn.Unflatten(1, (1, 8, 8)))
    nsf = zuko.flows.NSF(latent, context=hidden, transforms=2, hidden_features=(32, 32))
    model = VAE(
        GaussianEncoder(body, feature_dim=hidden, latent_dim=latent),
        decoder,
        build_likelihood("bernoulli", "binary"),
        latent,
        image_shape=(1, 8, 8),
        flow=F.from_transform(nsf.transform, context_dim=hidden, features=latent),
    )
    assert any(p is q for p in model.parameters() for q in nsf.parameters())  # the spline's weights train
    test = digits.test[:64]
    nll_before = objectives.importance_weighted_nll(
        model, test, samples=100, generator=torch.Generator().manual_seed(0)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = digits.train[torch.randint(len(digits.train), (64,))]
        loss = objectives.training_loss(model(batch), beta=min(1.0, step / 30))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    nll = objectives.importance_weighted_nll(model, test, samples=100, generator=torch.Generator().manual_seed(0))
    assert nll.shape == (64,) and nll.dtype == f64 and torch.isfinite(nll).all()
    assert nll.mean() < nll_before.mean() - 5.0
    q = model.posterior(test[:4])
    z, log_q = q.rsample_and_log_prob((3,))
    torch.testing.assert_close(q.log_prob(z.detach().clone()), log_q.detach(), rtol=0, atol=1e-4)
