"""The ResNet VAE with bidirectional inference (Kingma et al. 2016) and its channel-masked ConvIAF:
triangular Jacobians and exact log-dets in float64, the model protocol (shapes, KL groups, fixed
noise, chunking), Glow-style posteriors, data-dependent init, learning, sampling, 8-bit data."""

from __future__ import annotations

import pytest
import torch

from flowvae.flows.glow import SpatialContextCoupling
from flowvae.flows.masked_conv import ConvIAF
from flowvae.models.base import draw_noise
from flowvae.models.likelihoods import Bernoulli, DiscretizedLogistic
from flowvae.models.resnet import ResNetVAE, build_resnet_vae
from flowvae.models.weight_norm import initialise
from flowvae.numerics import soft_clamp

C, HW, CTX = 4, 3, 3  # latent channels, spatial size, context channels of the flow tests


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its (near-identity) initial value, so no test passes at the identity."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def flat_jacobian(fn, z: torch.Tensor) -> torch.Tensor:
    """Autograd Jacobian of fn at one example z (C, H, W), both flattened channel-major: (CHW, CHW)."""
    return torch.autograd.functional.jacobian(lambda v: fn(v.view(1, *z.shape))[0].reshape(-1), z.reshape(-1))


def tiny_model(
    flow: str = "iaf",
    steps: int = 1,
    layers: int = 3,
    shape=(1, 8, 8),
    likelihood=None,
    dtype=torch.float32,
    seed: int = 0,
    **kwargs,
) -> ResNetVAE:
    torch.manual_seed(seed)
    model = build_resnet_vae(
        shape,
        likelihood or Bernoulli(),
        layers=layers,
        channels=8,
        latent_channels=3,
        flow=flow,
        flow_steps=steps,
        flow_hidden=8,
        **kwargs,
    )
    return model.to(dtype)


def binary_images(n: int, shape=(1, 8, 8), seed: int = 0) -> torch.Tensor:
    """Bernoulli images with structure to learn: a bright band on a dark background."""
    g = torch.Generator().manual_seed(seed)
    p = torch.full(shape, 0.1)
    p[:, shape[1] // 4 : shape[1] // 2] = 0.9
    return torch.bernoulli(p.expand(n, *shape), generator=g)


# ---------------------------------------------------------------------------------------------
# (a) ConvIAF: autoregressive over channels, exact log-det, inverse
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["natural", "reversed"])
def test_conv_iaf_jacobian_is_triangular_in_its_channel_order_and_log_det_is_exact(order):
    flow = perturbed(ConvIAF(C, 12, CTX, order=order).double())
    z = torch.randn(C, HW, HW, dtype=torch.float64)
    context = torch.randn(1, CTX, HW, HW, dtype=torch.float64)
    jac = flat_jacobian(lambda v: flow(v, context), z)
    deg = flow.degrees.repeat_interleave(HW * HW)  # degree of each coordinate, channel-major
    same = torch.eye(len(deg), dtype=torch.bool)
    allowed = (deg[None, :] < deg[:, None]) | same  # output (i, p) reads input (j, q) only if deg j < deg i
    assert torch.all(jac[~allowed] == 0)
    assert torch.all(jac[allowed].abs() > 0), "every earlier channel at every pixel of the window should be read"
    order_of = torch.argsort(deg, stable=True)
    assert torch.all(torch.triu(jac[order_of][:, order_of], 1) == 0)  # triangular in the flow's order
    _, log_abs_det = flow(z.unsqueeze(0), context)
    torch.testing.assert_close(log_abs_det[0], torch.linalg.slogdet(jac).logabsdet, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", ["natural", "reversed"])
def test_conv_iaf_inverse_round_trips_and_broadcasts_context_over_samples(order):
    flow = perturbed(ConvIAF(C, 12, CTX, order=order).double(), scale=0.5)
    z = torch.randn(2, 5, C, HW, HW, dtype=torch.float64)  # (K, B, C, H, W)
    context = torch.randn(5, CTX, HW, HW, dtype=torch.float64)  # (B, Cc, H, W)
    y, ladj = flow(z, context)
    assert y.shape == z.shape and ladj.shape == (2, 5)
    x, ladj_inverse = flow.inverse(y, context)
    torch.testing.assert_close(x, z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ladj + ladj_inverse, torch.zeros_like(ladj), rtol=0, atol=1e-10)
    y_flat, ladj_flat = flow(z.reshape(10, C, HW, HW), context.expand(2, 5, CTX, HW, HW).reshape(10, CTX, HW, HW))
    torch.testing.assert_close(y, y_flat.reshape(z.shape))
    torch.testing.assert_close(ladj, ladj_flat.reshape(2, 5))


def test_conv_iaf_starts_near_identity_and_rejects_bad_shapes():
    flow = ConvIAF(C, 12, CTX)
    z, context = torch.randn(3, C, HW, HW), torch.randn(3, CTX, HW, HW)
    y, _ = flow(z, context)
    assert (y - z).abs().max() < 0.1 * z.abs().max()
    with pytest.raises(ValueError, match="expects z of shape"):
        flow(torch.randn(3, C + 1, HW, HW), context)
    with pytest.raises(ValueError, match="needs a context"):
        flow(z, None)
    with pytest.raises(ValueError, match="expects context of shape"):
        flow(z, torch.randn(3, CTX, HW + 1, HW))
    with pytest.raises(ValueError, match="does not broadcast"):
        flow(z, torch.randn(4, CTX, HW, HW))


# ---------------------------------------------------------------------------------------------
# (b), (c) the model protocol
# ---------------------------------------------------------------------------------------------


def test_log_densities_shapes_and_kl_groups_sum_to_log_q_minus_log_p():
    model, x = tiny_model(), binary_images(2)
    ld = model(x, samples=3)
    for field in (ld.log_likelihood, ld.log_prior, ld.log_posterior):
        assert field.shape == (3, 2) and field.dtype == torch.float32 and torch.isfinite(field).all()
    assert list(ld.latents) == ["z1", "z2", "z3"] == list(model.noise_shapes())
    assert all(z.shape == (3, 2, 3, 4, 4) for z in ld.latents.values())
    assert ld.kl_groups.shape == (3, 2, 9) and ld.group_units == (1,) * 9
    assert ld.group_names[:4] == ("z1/c0", "z1/c1", "z1/c2", "z2/c0")
    torch.testing.assert_close(ld.kl_groups.sum(-1), ld.log_posterior - ld.log_prior, rtol=1e-5, atol=1e-4)


def test_replacing_the_top_prior_changes_log_p_by_exactly_the_two_priors_difference():
    class StandardNormal(torch.nn.Module):  # only log_prob and sample: no per-channel split
        def log_prob(self, z):
            return (-0.5 * z * z - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=z.dtype))).flatten(-3).sum(-1)

        def sample(self, n, generator=None):
            return torch.randn(n, 3, 4, 4, generator=generator)

    model, x = tiny_model(dtype=torch.float64), binary_images(2)
    noise = draw_noise(model, 2, 2, generator=torch.Generator().manual_seed(1))
    before = model(x, 2, noise)
    default = model.prior
    model.prior = StandardNormal()
    after = model(x, 2, noise)
    top = before.latents["z3"]
    torch.testing.assert_close(after.log_prior - before.log_prior, model.prior.log_prob(top) - default.log_prob(top))
    torch.testing.assert_close(after.log_posterior, before.log_posterior)
    torch.testing.assert_close(after.kl_groups.sum(-1), after.kl)
    assert model.sample(2).shape == (2, 1, 8, 8)


def test_same_noise_same_densities_and_chunks_of_samples_match_one_call():
    model, x = tiny_model(dtype=torch.float64), binary_images(3)
    encoded = model.encode(x)
    noise = draw_noise(model, 4, 3, generator=torch.Generator().manual_seed(2))
    whole = model.log_densities(x, encoded, 4, noise)
    again = model.log_densities(x, model.encode(x), 4, noise)
    first = model.log_densities(x, encoded, 2, {k: v[:2] for k, v in noise.items()})
    second = model.log_densities(x, encoded, 2, {k: v[2:] for k, v in noise.items()})
    other = model.log_densities(x, encoded, 4, draw_noise(model, 4, 3, generator=torch.Generator().manual_seed(3)))
    for name in ("log_likelihood", "log_prior", "log_posterior", "kl_groups"):
        a, b = getattr(whole, name), getattr(again, name)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, torch.cat([getattr(first, name), getattr(second, name)]), rtol=1e-12, atol=1e-10)
        assert not torch.allclose(a, getattr(other, name))
    torch.testing.assert_close(whole.latents["z2"], torch.cat([first.latents["z2"], second.latents["z2"]]))


def test_bad_inputs_raise_one_line_errors():
    model, x = tiny_model(), binary_images(2)
    with pytest.raises(ValueError, match="expects images of shape"):
        model(torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError, match=r"noise\['z1'\] must have shape"):
        model(x, 2, {k: v[:1] for k, v in draw_noise(model, 2, 2).items()})
    with pytest.raises(ValueError, match="noise must be a dict with keys"):
        model(x, 1, {"z1": torch.zeros(1, 2, 3, 4, 4)})
    with pytest.raises(ValueError, match="samples must be >= 1"):
        model(x, 0)
    with pytest.raises(ValueError, match="same batch"):
        model.log_densities(x, model.encode(x[:1]))
    with pytest.raises(ValueError, match="unknown flow"):
        tiny_model(flow="maf")


# ---------------------------------------------------------------------------------------------
# (d) Glow-style and coupling posteriors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flow", ["glow", "coupling", "iaf"])
def test_each_layers_posterior_flow_has_an_exact_log_det_and_an_inverse(flow):
    model = perturbed(tiny_model(flow, steps=2, dtype=torch.float64), scale=0.2)
    model.eval()
    steps = model.layers[0].flow
    z = torch.randn(3, 4, 4, dtype=torch.float64)
    context = torch.randn(1, 8, 4, 4, dtype=torch.float64)

    def forward(v):
        total = v.new_zeros(v.shape[:-3])
        for step in steps:
            v, ladj = step(v, context)
            total = total + ladj
        return v, total

    jac = flat_jacobian(forward, z)
    y, ladj = forward(z.unsqueeze(0))
    torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jac).logabsdet, rtol=1e-9, atol=1e-9)
    x = y
    for step in reversed(steps):
        x, _ = step.inverse(x, context)
    torch.testing.assert_close(x[0], z, rtol=1e-9, atol=1e-9)
    _, per_channel = model.layers[0]._flow(z.expand(2, 1, 3, 4, 4), context)
    torch.testing.assert_close(per_channel.sum(-1), ladj.expand(2, 1))  # the KL groups' share adds up


@pytest.mark.parametrize("flow", ["glow", "coupling"])
def test_glow_style_posterior_model_is_finite_and_consistent(flow):
    model, x = tiny_model(flow, steps=2), binary_images(4)
    model.initialise(x)  # also runs ActNorm's data-dependent init
    ld = model(x, samples=2)
    assert ld.kl_groups.shape == (2, 4, 9)
    assert all(torch.isfinite(t).all() for t in (ld.log_likelihood, ld.log_prior, ld.log_posterior))
    torch.testing.assert_close(ld.kl_groups.sum(-1), ld.kl, rtol=1e-5, atol=1e-4)
    coupling = [s for s in model.layers[0].flow if isinstance(s, SpatialContextCoupling)]
    assert len(coupling) == 2 and coupling[0].swap != coupling[1].swap


# ---------------------------------------------------------------------------------------------
# (e), (f) learning and data-dependent initialisation
# ---------------------------------------------------------------------------------------------


def test_adam_steps_lower_the_negative_elbo():
    model, x = tiny_model(layers=2), binary_images(16)
    model.initialise(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(15):
        noise = draw_noise(model, 1, 16, generator=torch.Generator().manual_seed(step))
        loss = -model(x, 1, noise).log_weight.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)), losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 5.0, losses


def test_data_dependent_init_normalises_pre_activations_on_the_batch():
    model, x = tiny_model(layers=3), binary_images(32)
    captured: dict[str, torch.Tensor] = {}
    watched = {"input": model.input_conv, "deep": model.layers[0].down_out, "heads": model.layers[1].up_in}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: captured.__setitem__(name, out.detach()))
        for name, m in watched.items()
    ]

    def stats(name):
        out = captured[name]
        return out.mean((0, 2, 3)), out.std((0, 2, 3), unbiased=False)

    def run():
        model(x, 1, draw_noise(model, 1, 32, generator=torch.Generator().manual_seed(0)))

    run()
    assert (stats("deep")[1] - 1).abs().max() > 0.1  # not normalised before
    initialise(model, x)
    run()
    for name in ("input", "deep"):
        mean, std = stats(name)
        torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-4)
        torch.testing.assert_close(std, torch.ones_like(std), rtol=0, atol=1e-3)
    _, std = stats("heads")  # μ_q, log σ_q channels start small, the rest at unit scale
    torch.testing.assert_close(std[:6], torch.full((6,), 0.1), rtol=0, atol=1e-4)
    torch.testing.assert_close(std[6:], torch.ones(std.numel() - 6), rtol=0, atol=1e-3)
    for hook in hooks:
        hook.remove()


# ---------------------------------------------------------------------------------------------
# (g) sampling, 8-bit data, odd sizes, autocast
# ---------------------------------------------------------------------------------------------


def test_sample_returns_reproducible_images_in_the_unit_interval():
    model = tiny_model()
    model.initialise(binary_images(4))
    images = model.sample(5, torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, model.sample(5, torch.Generator().manual_seed(0)))
    assert model.reconstruct(binary_images(3)).shape == (3, 1, 8, 8)


def test_eight_bit_images_with_the_discretized_logistic():
    model = tiny_model(shape=(3, 8, 8), likelihood=DiscretizedLogistic(), layers=2)
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model.initialise(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = -model(x, 2).log_weight.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    images = model.sample(2)
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("downsample", [True, False])
def test_odd_image_sizes_and_both_resolutions(downsample):
    model = tiny_model(shape=(1, 7, 6), layers=1, downsample=downsample)
    x = binary_images(2, shape=(1, 7, 6))
    ld = model(x, 2)
    assert model.noise_shapes() == {"z1": (3, 4, 3) if downsample else (3, 7, 6)}
    assert ld.log_likelihood.shape == (2, 2) and model.sample(3).shape == (3, 1, 7, 6)


def test_densities_stay_float32_under_autocast():
    model, x = tiny_model(), binary_images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ld = model(x, 2)
    for t in (ld.log_likelihood, ld.log_prior, ld.log_posterior, ld.kl_groups):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()


def test_log_posterior_is_the_base_density_at_the_inverted_flow_plus_its_log_det():
    """White-box check of one layer: invert the layer's flow at the returned z, score z₀ under the
    Gaussian N(μ_q + μ_r, σ_q σ_r), add the inverse log-det; the prior is the top prior at z."""
    model, x = perturbed(tiny_model("iaf", steps=2, layers=1, dtype=torch.float64), scale=0.2), binary_images(2)
    noise = draw_noise(model, 3, 2, generator=torch.Generator().manual_seed(4))
    encoded = model.encode(x)
    ld = model.log_densities(x, encoded, 3, noise)
    layer = model.layers[0]
    parts = layer._down_parts(model._top_state(6), 3)
    q_mean, q_log_std, up_context = encoded.layers[0]  # layer z1: μ_q, log σ_q, up-context
    mean = q_mean + parts["r_mean"]
    std = torch.exp(soft_clamp(q_log_std + parts["r_log_std"], 8.0))
    context = up_context + parts["context"]
    z, log_det_inverse = ld.latents["z1"], 0.0
    for step in reversed(layer.flow):
        z, ladj = step.inverse(z, context)
        log_det_inverse = log_det_inverse + ladj
    torch.testing.assert_close(z, mean + std * noise["z1"])
    base = torch.distributions.Normal(mean, std).log_prob(z).sum((-3, -2, -1))
    torch.testing.assert_close(ld.log_posterior, base + log_det_inverse)
    torch.testing.assert_close(ld.log_prior, model.prior.log_prob(ld.latents["z1"]))
