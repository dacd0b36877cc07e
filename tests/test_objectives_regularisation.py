"""Issue 23, sections 1-2: the IWAE objective and the STL/DReG gradient estimators (unbiasedness and
variance on a linear-Gaussian model), and the regularisation and parametrisation options, each end to
end through a tiny digits run."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import tiny_runs
import torch
from torch import nn

from flowvae import distributed, evaluation, objectives, optimizers, schedules, training
from flowvae.cli import main
from flowvae.config import TrainConfig
from flowvae.models import VAE, GaussianEncoder, LadderVAE, build_model, draw_noise
from flowvae.models.config import ModelConfig
from flowvae.models.likelihoods import Likelihood, build_likelihood
from flowvae.models.networks import GatedLinear, LocalAutoregression, MLPDecoder, sample_autoregressively
from flowvae.training import loop

TINY = tiny_runs.DIGITS_MLP | dict(epochs=2)
TINY_FLAGS = tiny_runs.flags(tiny_runs.DIGITS_MLP)


def tiny(tmp_path: Path, **overrides) -> TrainConfig:
    return TrainConfig.from_dict(TINY | {"out": str(tmp_path / "run")} | overrides).validate()


# ------------------------------------------------------------------------- a linear-Gaussian model


class FixedGaussian(Likelihood):
    """log N(x; params, s² I) over the "pixels" of a (1, 1, D) image."""

    name, params_per_pixel, data_kinds = "fixed_gaussian", 1, ("real",)

    def __init__(self, std: float) -> None:
        self.std = std

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        eps = (x - params).flatten(-3) / self.std
        return -(0.5 * eps * eps + math.log(self.std) + 0.5 * math.log(2 * math.pi)).sum(-1)


X_DIM, Z_DIM, NOISE_STD = 4, 2, 0.7


def linear_gaussian(at_optimum: bool, seed: int = 0) -> tuple[VAE, torch.Tensor]:
    """p(z) = N(0, I), p(x|z) = N(W z + b, s² I) with orthogonal columns of W, so the exact
    posterior N(Σ Wᵀ(x − b)/s², Σ), Σ = (I + WᵀW/s²)⁻¹, is a diagonal Gaussian whose mean is linear
    in x: the encoder can represent it exactly.  ``at_optimum`` puts the encoder there (else a
    perturbed encoder).  Returns the model (float64) and three data points x (3, 1, 1, D)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(X_DIM, Z_DIM, generator=g, dtype=torch.float64))
    W = q * torch.tensor([1.5, 0.8], dtype=torch.float64)
    b = torch.randn(X_DIM, generator=g, dtype=torch.float64)
    sigma = torch.linalg.inv(torch.eye(Z_DIM, dtype=torch.float64) + W.T @ W / NOISE_STD**2)
    encoder = GaussianEncoder(nn.Flatten(), X_DIM, Z_DIM).double()
    decoder = nn.Sequential(nn.Linear(Z_DIM, X_DIM), nn.Unflatten(-1, (1, 1, X_DIM))).double()
    with torch.no_grad():
        decoder[0].weight.copy_(W)
        decoder[0].bias.copy_(b)
        encoder.mean.weight.copy_(sigma @ W.T / NOISE_STD**2)
        encoder.mean.bias.copy_(-sigma @ W.T @ b / NOISE_STD**2)
        encoder.log_std.weight.zero_()
        # undo the ±8 soft clamp
        encoder.log_std.bias.copy_(8 * torch.atanh(0.5 * torch.log(torch.diagonal(sigma)) / 8))
        if not at_optimum:
            for p in encoder.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    model = VAE(encoder, decoder, FixedGaussian(NOISE_STD), Z_DIM, (1, 1, X_DIM))
    z = torch.randn(3, Z_DIM, generator=g, dtype=torch.float64)
    x = (z @ W.T + b + NOISE_STD * torch.randn(3, X_DIM, generator=g, dtype=torch.float64)).reshape(3, 1, 1, X_DIM)
    return model, x


def gradient_draws(
    model: VAE, x: torch.Tensor, draws: int, samples: int, objective: str, gradients: list[str], beta: float = 1.0
) -> dict[str, torch.Tensor]:
    """``draws`` single-batch gradient estimates of every parameter (flattened), (draws, P) per
    estimator; all estimators see the same noise in each draw (paired)."""
    g = torch.Generator().manual_seed(1)
    params = list(model.parameters())
    out: dict[str, list[torch.Tensor]] = {name: [] for name in gradients}
    for _ in range(draws):
        noise = draw_noise(model, samples, len(x), generator=g)
        for name in gradients:
            ld = model(x, samples, noise=noise, path_gradient=name != "reparam")
            loss = objectives.training_loss(ld, beta, objective=objective, gradient=name)
            grads = torch.autograd.grad(loss, params)
            out[name].append(torch.cat([t.flatten() for t in grads]))
    return {name: torch.stack(v) for name, v in out.items()}


@pytest.mark.parametrize(
    "objective, samples, estimator, beta",
    [
        ("elbo", 1, "stl", 1.0),
        ("elbo", 1, "stl", 0.3),
        ("iwae", 5, "dreg", 1.0),
        ("iwae", 5, "dreg", 0.5),
        ("elbo", 4, "stl", 1.0),
        ("elbo", 3, "dreg", 1.0),
    ],
)
def test_path_gradients_are_unbiased_on_a_linear_gaussian_model(objective, samples, estimator, beta):
    """The mean over 1500 draws of the STL/DReG gradient equals the mean of the plain reparameterized
    gradient of the same objective: their paired difference is within 4 standard errors of 0 in every
    coordinate (and 5e-3 absolute, for coordinates whose difference is ~0 every time)."""
    model, x = linear_gaussian(at_optimum=False)
    draws = 1500
    g = gradient_draws(model, x, draws, samples, objective, ["reparam", estimator], beta)
    diff = g[estimator] - g["reparam"]
    se = diff.std(0) / math.sqrt(draws)
    assert (diff.mean(0).abs() <= 4 * se + 5e-3).all(), (diff.mean(0), se)
    assert diff.abs().max() > 1e-3, "the estimators should differ draw by draw"


@pytest.mark.parametrize("objective, samples, estimator", [("elbo", 1, "stl"), ("iwae", 5, "dreg")])
def test_path_gradients_have_lower_variance_at_the_optimum(objective, samples, estimator):
    """With q the exact posterior, log w is constant in z: the path gradient of the encoder is zero
    in every draw, while the reparameterized one is not."""
    model, x = linear_gaussian(at_optimum=True)
    encoder_size = sum(p.numel() for p in model.encoder.parameters())
    g = gradient_draws(model, x, 300, samples, objective, ["reparam", estimator])
    var_path, var_plain = g[estimator][:, :encoder_size].var(0), g["reparam"][:, :encoder_size].var(0)
    assert var_path.sum() < 1e-20 and var_plain.sum() > 1e-2
    assert (var_path <= var_plain).all()


def test_the_exact_posterior_is_what_the_linear_gaussian_model_says():
    """The test model's encoder at the optimum is the exact posterior: log w is the same for every z."""
    model, x = linear_gaussian(at_optimum=True)
    log_w = model(x, 50).log_weight
    assert (log_w - log_w[0]).abs().max() < 1e-10


def test_path_log_densities_have_the_same_values():
    model, x = linear_gaussian(at_optimum=False)
    noise = draw_noise(model, 7, len(x), generator=torch.Generator().manual_seed(0))
    plain, path = model(x, 7, noise=noise), model(x, 7, noise=noise, path_gradient=True)
    for name in ("log_likelihood", "log_prior", "log_posterior"):
        torch.testing.assert_close(getattr(path, name), getattr(plain, name))


# ------------------------------------------------------------------------------- the IWAE objective


def small(arch: str, **kw) -> nn.Module:
    options = {"arch": arch, "hidden": 16, "latent_dim": 3, "layers": 2, "channels": 8} | kw
    shape = (1, 8, 8)
    return build_model(ModelConfig(**options), shape, "binary").double()


@pytest.mark.parametrize(
    "arch, options",
    [
        ("mlp", {}),
        ("mlp", {"flow": "iaf", "flow_steps": 2}),
        ("ladder", {}),
        ("ladder", {"prior": "vamp", "pseudo_inputs": 4}),
        ("resnet", {}),
    ],
)
def test_iwae_loss_is_the_iwae_bound_for_every_model(arch, options):
    model = small(arch, **options)
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    ld = model(x, 6)
    torch.testing.assert_close(objectives.training_loss(ld, objective="iwae"), -objectives.iwae_bound(ld).mean())
    loss = objectives.training_loss(ld, objective="iwae", normalizer=2.0)
    torch.testing.assert_close(loss, -objectives.iwae_bound(ld).sum() / 2)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > len(list(model.parameters())) // 2 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("beta, free_bits", [(1.0, 0.0), (0.4, 0.0), (0.4, 0.5), (1.0, 2.0)])
def test_iwae_with_one_sample_is_the_elbo_loss_with_warmup_and_free_bits(beta, free_bits):
    model = small("ladder")
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    ld = model(x, 1)
    torch.testing.assert_close(objectives.iwae_loss(ld, beta, free_bits), objectives.elbo_loss(ld, beta, free_bits))


def test_annealed_iwae_bound_lies_between_the_elbo_and_the_prior_free_bound():
    """log (1/K) Σ w^β with β = 0 is log (1/K) Σ p(x|z_k); β = 1 is the IWAE bound; the IWAE bound is
    above the ELBO of the same samples."""
    model = small("mlp")
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    ld = model(x, 8)
    assert objectives.iwae_loss(ld, 1.0) <= objectives.elbo_loss(ld, 1.0) + 1e-12
    expected = -(torch.logsumexp(ld.log_likelihood, 0) - math.log(8)).mean()
    torch.testing.assert_close(objectives.iwae_loss(ld, 0.0), expected)


def test_biased_combinations_are_refused_by_the_loss():
    model, x = linear_gaussian(at_optimum=False)
    ld = model(x, 3, path_gradient=True)
    with pytest.raises(ValueError, match="stl is biased for --objective iwae"):
        objectives.training_loss(ld, objective="iwae", gradient="stl")
    with pytest.raises(ValueError, match="free-bits"):
        objectives.training_loss(ld, free_bits=0.1, gradient="dreg")


# ------------------------------------------------------------------ configuration and command line

NEW_FLAGS = [
    "--objective",
    "--train-samples",
    "--gradient",
    "--weight-decay",
    "--input-noise",
    "--output-bias-init",
    "--lr-schedule",
    "--lr-floor",
    "--activation",
    "--dropout",
    "--posterior-log-var-min",
    "--posterior-log-var-max",
    "--pseudo-inputs",
    "--autoregressive-decoder",
    "--pixelcnn-layers",
    "--pixelcnn-channels",
    "--pixelcnn-conditioned",
]


def test_help_lists_every_new_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in NEW_FLAGS:
        assert flag in text, flag
    for words in (
        "Burda et al. 2016",
        "sticking the landing",
        "decoupled weight decay",
        "encoder's input",
        "gated",
        "dropout probability",
        "logit(mean training pixel)",
        "log variance",
        "pseudo-inputs (mixture components) of --prior vamp",
        "autoregressive over the pixels",
        "--max-minutes",
    ):
        assert words in text, words


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--objective", "vi"], "objective must be one of elbo, iwae"),
        (["--train-samples", "0"], "train_samples must be >= 1"),
        (["--gradient", "score"], "gradient must be one of reparam, stl, dreg"),
        (["--gradient", "stl", "--objective", "iwae", "--train-samples", "4"], "biased for --objective iwae"),
        (["--gradient", "dreg", "--free-bits", "0.1"], "free-bits"),
        (["--gradient", "dreg", "--compile"], "dreg does not work with --compile"),
        (["--gradient", "stl", "--flow", "iaf"], "--gradient stl is not implemented for the IAF flow posterior"),
        (
            ["--gradient", "dreg", "--arch", "ladder"],
            "--gradient dreg is not implemented for the posterior of LadderVAE",
        ),
        (["--weight-decay", "-0.1"], "weight_decay must be in [0, 1)"),
        (["--weight-decay", "nan"], "weight_decay must be finite"),
        (["--input-noise", "-1"], "input_noise must be >= 0"),
        (["--dropout", "1"], "dropout must be in [0, 1)"),
        (["--activation", "relu"], "activation must be elu or gated"),
        (["--arch", "conv", "--dropout", "0.1"], "arch must be one of mlp, ladder for --activation and --dropout"),
        (["--arch", "conv", "--output-bias-init"], "for --output-bias-init"),
        (["--posterior-log-var-max", "2"], "must be given together"),
        (["--posterior-log-var-min", "3", "--posterior-log-var-max", "2"], "must be below posterior_log_var_max"),
        (["--arch", "resnet", "--posterior-log-var-min", "-6", "--posterior-log-var-max", "2"], "must not be resnet"),
        (["--lr-schedule", "linear"], "lr_schedule must be one of constant, cosine, exponential"),
        (["--lr-schedule", "cosine", "--lr-floor", "0.1"], "lr_floor must be in (0, lr)"),
        (["--lr-schedule", "cosine", "--lr-decay", "0.5"], "must be constant when lr_decay < 1"),
        (["--pseudo-inputs", "0", "--prior", "vamp"], "pseudo_inputs must be > 0"),
        (["--autoregressive-decoder", "-1", "--arch", "ladder"], "autoregressive_decoder must be >= 0 (0: off)"),
        (["--autoregressive-decoder", "8"], "arch must be ladder for --autoregressive-decoder and --pixelcnn-layers"),
        (["--pixelcnn-layers", "-1", "--arch", "ladder"], "pixelcnn_layers must be >= 0 (0: off)"),
        (["--pixelcnn-channels", "0", "--arch", "ladder"], "pixelcnn_channels must be >= 1"),
        (["--pixelcnn-conditioned", "--arch", "ladder"], "pixelcnn_conditioned needs --pixelcnn-layers"),
    ],
)
def test_bad_values_are_one_line_errors_and_leave_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", *TINY_FLAGS, "--epochs", "1", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


# ------------------------------------------------------------------------------ the options, one by one


def test_gated_linear_is_a_sigmoid_gated_product():
    layer = GatedLinear(5, 3)
    x = torch.randn(4, 5)
    full = layer.linear(x)
    torch.testing.assert_close(layer(x), full[:, :3] * torch.sigmoid(full[:, 3:]))
    model = small("mlp", activation="gated")
    assert sum(isinstance(m, GatedLinear) for m in model.modules()) == 4
    assert not any(isinstance(m, nn.ELU) for m in model.modules())
    ladder = small("ladder", activation="gated")
    assert any(isinstance(m, GatedLinear) for m in ladder.decoder.modules())


@pytest.mark.parametrize("arch", ["mlp", "ladder"])
def test_dropout_is_active_in_training_only(arch):
    model = small(arch, dropout=0.5)
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.5}
    x = torch.ones(2, 1, 8, 8, dtype=torch.float64)
    noise = draw_noise(model, 1, 2, generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(0)
    a = model(x, noise=noise).log_likelihood
    torch.manual_seed(1)
    b = model(x, noise=noise).log_likelihood
    assert not torch.equal(a, b)
    model.eval()
    torch.testing.assert_close(model(x, noise=noise).log_likelihood, model(x, noise=noise).log_likelihood)
    assert not any(isinstance(m, nn.Dropout) for m in small(arch).modules())


@pytest.mark.parametrize("arch", ["mlp", "ladder"])
def test_posterior_log_variance_stays_in_its_bounds(arch):
    model = small(arch, posterior_log_var_min=-6.0, posterior_log_var_max=2.0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(200)  # drive every raw log σ far out
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    if arch == "mlp":
        _, log_std = model.gaussian_parameters(x)
    else:
        _, log_std = model.top_gaussian_parameters(x)
    assert log_std.abs().max() > 0.5
    assert (2 * log_std >= -6).all() and (2 * log_std <= 2).all()
    assert (2 * log_std).min() < -5.5 or (2 * log_std).max() > 1.5  # the bound is reached, not just respected


def _ladder_with_autoregressive_decoder(**options: int) -> LadderVAE:
    model = small("ladder", **({"autoregressive_decoder": 12} | options))
    assert isinstance(model, LadderVAE) and model.autoregressive
    return model


def _randomise(module: nn.Module, seed: int) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "options, reads",
    [
        ({}, "all"),  # MADE and its direct connections: every earlier pixel
        ({"autoregressive_decoder": 0, "pixelcnn_layers": 2}, "window"),
        ({"autoregressive_decoder": 0, "pixelcnn_layers": 2, "pixelcnn_conditioned": True}, "window"),
        ({"pixelcnn_layers": 1, "pixelcnn_channels": 4}, "all"),
    ],
)
def test_autoregressive_decoder_starts_as_the_plain_decoder_and_each_logit_sees_only_earlier_pixels(options, reads):
    model = _ladder_with_autoregressive_decoder(**options)
    plain = small("ladder")
    terms = ("pixel_made.", "pixel_cnn.")
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(terms)})
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    noise = draw_noise(model, 3, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x, 3, noise).log_weight, plain(x, 3, noise).log_weight)
    for name in ("pixel_made", "pixel_cnn"):
        if getattr(model, name) is not None:
            _randomise(getattr(model, name), 2)
    z, t = torch.randn(1, 4, 3, dtype=torch.float64), torch.randn(1, 4, 16, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(
        lambda v: model._decode(z, t, v.view(4, 1, 8, 8))[0, 0].flatten(), x.view(4, 64)
    )
    own = jacobian[:, 0]  # (64 logits of image 0, 64 pixels of image 0)
    assert (own.triu() == 0).all(), "a logit depends on its own pixel or a later one"
    assert (jacobian[:, 1:] == 0).all(), "a logit depends on another image"
    earlier = torch.ones(64, 64, dtype=torch.bool).tril(-1)
    if reads == "all":
        assert (own[earlier] != 0).all(), "every logit reads every earlier pixel"
    else:  # a 5x5 mask-A then a 3x3 mask-B convolution: at most 3 rows up and 3 columns across
        row, col = torch.arange(64) // 8, torch.arange(64) % 8
        near = ((row[:, None] - row[None, :]).abs() <= 3) & ((col[:, None] - col[None, :]).abs() <= 3)
        assert (own[~near] == 0).all()
        centre = 4 * 8 + 4
        assert own[centre, centre - 1] != 0 and own[centre, centre - 8] != 0, "reads the pixels left and above"
        assert (own[centre] != 0).sum() >= 20
    ld = model(x, 3, noise)
    assert torch.isfinite(ld.log_weight).all() and not torch.allclose(ld.log_weight, plain(x, 3, noise).log_weight)


def test_pixelcnn_term_shares_its_weights_over_the_image():
    model = _ladder_with_autoregressive_decoder(autoregressive_decoder=0, pixelcnn_layers=2, pixelcnn_channels=5)
    assert sum(p.numel() for p in model.pixel_cnn.parameters()) == (25 * 5 + 5) + (9 * 25 + 5) + (5 + 1)
    big = small("ladder", pixelcnn_layers=2, pixelcnn_channels=5)
    assert isinstance(big, LadderVAE) and big.pixel_cnn is not None
    with pytest.raises(ValueError, match="single-channel images"):
        build_model(ModelConfig(arch="ladder", hidden=8, latent_dim=2, pixelcnn_layers=1), (3, 8, 8), "binary")


def test_conditioned_pixelcnn_term_mixes_each_logit_into_its_last_layer():
    """b_i = w · ELU(u_i(x) + s ⊙ l_i) + c, computed once per image up to the 1×1 layer; s = 0 gives the sum."""
    term = LocalAutoregression(channels=3, layers=2, conditioned=True).double()
    _randomise(term, 6)
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(7))
    logits = torch.randn(5, 4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(8))  # (K, B, P)
    hidden = term.net[:-2](x).flatten(2)  # (B, C, P)
    mixed = torch.nn.functional.elu(hidden + term.logit_scale[:, None] * logits[:, :, None])  # (K, B, C, P)
    expected = torch.einsum("kbcp,c->kbp", mixed, term.net[-1].weight.flatten()) + term.net[-1].bias
    torch.testing.assert_close(term(x, logits), expected)
    assert not torch.allclose(term(x, logits)[0], term(x, logits)[1]), "the term reads each sample's logits"
    with torch.no_grad():
        term.logit_scale.zero_()
    torch.testing.assert_close(term(x, logits), term.net(x).flatten(1).expand(5, 4, 64))
    with pytest.raises(ValueError, match="reads the decoder's logits"):
        term(x)


def test_conditioned_pixelcnn_term_under_torch_compile_is_the_eager_loop_and_its_gradient():
    """Traced by torch.compile, the term takes its one-expression form (fused by inductor): the same
    values and parameter gradients as the eager per-channel loop, in float64."""
    term = LocalAutoregression(channels=3, layers=2, conditioned=True).double()
    _randomise(term, 9)
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(1))
    logits = torch.randn(5, 4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def value_and_grads(fn):
        out = fn(x, logits)
        return out, torch.autograd.grad(out.square().sum(), list(term.parameters()))

    eager, eager_grads = value_and_grads(term)
    torch._dynamo.reset()
    traced, traced_grads = value_and_grads(torch.compile(term, backend="eager", fullgraph=True))
    torch.testing.assert_close(traced, eager)
    for got, expected in zip(traced_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_ladder_with_conditioned_pixelcnn_scores_importance_samples_in_one_compiled_graph():
    """torch.compile traces the ladder's log_densities without a graph break (fullgraph=True), and
    the traced scoring gives the eager importance-weighted estimate."""
    model = small("ladder", pixelcnn_layers=2, pixelcnn_channels=3, pixelcnn_conditioned=True, flow="iaf").eval()
    _randomise(model.pixel_cnn, 3)
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(4))

    def estimate(score):
        return objectives.importance_weighted_estimate(model, x, 12, 5, torch.Generator().manual_seed(5), score).nll

    torch._dynamo.reset()
    traced = torch.compile(model.log_densities, backend="eager", fullgraph=True)
    torch.testing.assert_close(estimate(traced), estimate(None))


def test_pixelcnn_term_does_not_shrink_the_importance_sampling_chunks():
    """It reads the images alone, so unlike a convolutional decoder it costs nothing per sample: a
    ladder with it is scored in chunks as large as the plain ladder's."""
    plain, local = small("ladder"), small("ladder", pixelcnn_layers=2)
    chunks = evaluation.auto_chunk_size(plain, 100, 1000, evaluation.CPU_DECODE_BUDGET)
    assert chunks[1] > 1 and evaluation.auto_chunk_size(local, 100, 1000, evaluation.CPU_DECODE_BUDGET) == chunks
    assert evaluation.auto_chunk_size(small("resnet"), 100, 1000, evaluation.CPU_DECODE_BUDGET)[1] < chunks[1]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"autoregressive_decoder": 0, "pixelcnn_layers": 2},
        {"autoregressive_decoder": 0, "pixelcnn_layers": 2, "pixelcnn_conditioned": True},
    ],
)
def test_autoregressive_decoder_samples_pixel_by_pixel_from_its_own_conditionals(options):
    model = _ladder_with_autoregressive_decoder(**options)
    _randomise(model, 3)
    base, h = torch.randn(5, 64, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return model._autoregressive_logits(x.view(-1, 1, 8, 8), h, base)

    x, probs = sample_autoregressively(logits, base, torch.Generator().manual_seed(4))
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(probs, torch.sigmoid(logits(x)))  # teacher-forced at the draw
    images = model.sample(3, torch.Generator().manual_seed(5))
    assert images.shape == (3, 1, 8, 8) and ((images >= 0) & (images <= 1)).all()
    assert model.reconstruct(x.view(5, 1, 8, 8)).shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="needs the bernoulli likelihood"):
        build_model(ModelConfig(arch="ladder", hidden=8, latent_dim=2, autoregressive_decoder=4), (1, 8, 8), "8bit")


def test_ladder_with_autoregressive_decoder_trains_resumes_and_evaluates(tmp_path):
    options = dict(
        arch="ladder",
        autoregressive_decoder=16,
        pixelcnn_layers=1,
        pixelcnn_channels=4,
        pixelcnn_conditioned=True,
        eval_samples=8,
    )
    straight = tiny(tmp_path / "a", epochs=2, **options)
    results = training.train(straight)
    assert math.isfinite(results["test"]["nll"]) and results["test"]["nll"] <= results["test"]["neg_elbo"] + 1.0
    halves = tiny(tmp_path / "b", epochs=1, **options)
    training.train(halves)
    halves.epochs = 2
    training.train(halves, resume=True)
    a = torch.load(Path(straight.out) / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(Path(halves.out) / "checkpoint.pt", weights_only=True)["model"]
    assert any(k.startswith("pixel_made.") for k in a) and any(k.startswith("pixel_cnn.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["mlp", "ladder"])
def test_output_bias_starts_at_the_logit_of_the_mean_pixel(arch):
    model = small(arch)
    mean_image = torch.rand(1, 8, 8, dtype=torch.float64) * 0.98 + 0.01
    model.init_output_bias(mean_image)
    last = model.decoder.output if arch == "mlp" else model.decoder[-1]
    torch.testing.assert_close(last.bias, torch.logit(mean_image).flatten())
    with pytest.raises(ValueError, match="cannot initialise its decoder's output bias"):
        small("resnet").init_output_bias(mean_image)
    with pytest.raises(ValueError, match="no output-bias initialisation"):
        build_likelihood("categorical256", "8bit").params_for_mean(mean_image)


def test_training_starts_with_the_output_bias_at_the_data_mean(tmp_path):
    config = tiny(tmp_path, output_bias_init=True, epochs=1)
    run = training.start_run(config, False, distributed.Context(), torch.device("cpu"))
    mean = run.data.train.double().mean(0).clamp(1e-3, 1 - 1e-3)
    decoder = run.model.decoder
    assert isinstance(decoder, MLPDecoder)
    torch.testing.assert_close(decoder.output.bias.double(), torch.logit(mean).flatten(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "adamax"])
def test_weight_decay_is_decoupled(tmp_path, optimizer):
    """With a zero gradient the Adam/Adamax step is zero, so only the decoupled decay w ← w (1 − lr λ)
    moves the weights (an L2 term would pass through the adaptive step instead)."""
    config = tiny(tmp_path, optimizer=optimizer, weight_decay=0.1, lr=0.01)
    model = nn.Linear(3, 2)
    opt = optimizers.build_optimizer(config, model, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.detach(), b * (1 - 0.01 * 0.1))


def test_input_noise_reaches_the_encoder_only():
    model = small("mlp")
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    noise = draw_noise(model, 2, 5, generator=torch.Generator().manual_seed(0))
    noisy = x + 0.3 * torch.randn(x.shape, dtype=x.dtype)
    plain, with_noise = model(x, 2, noise=noise), model(x, 2, noise=noise, encoder_input=noisy)
    by_hand = model.log_densities(x, model.encode(noisy), 2, noise)
    assert not torch.allclose(plain.log_posterior, with_noise.log_posterior)
    torch.testing.assert_close(with_noise.log_likelihood, by_hand.log_likelihood)


def test_budget_aware_schedules_run_from_lr_to_the_floor():
    for kind in ("cosine", "exponential"):
        lrs = [schedules.scheduled_lr(kind, 1e-3, 1e-5, s, 100) for s in range(121)]
        assert lrs[0] == pytest.approx(1e-3) and lrs[100] == pytest.approx(1e-5) and lrs[120] == pytest.approx(1e-5)
        assert all(a >= b for a, b in itertools.pairwise(lrs))
    assert schedules.scheduled_lr("exponential", 1e-3, 1e-5, 50, 100) == pytest.approx(1e-4)
    assert schedules.scheduled_lr("cosine", 1e-3, 1e-5, 50, 100) == pytest.approx((1e-3 + 1e-5) / 2)
    # 600 steps in 60 s: 10 minutes allow 6000 steps, fewer than 100 epochs of 100 steps.
    assert schedules.budget_steps(600, 60.0, 10, 10_000) == pytest.approx(6000)
    assert schedules.budget_steps(600, 60.0, None, 10_000) == 10_000
    assert schedules.budget_steps(600, 60.0, 1000, 10_000) == 10_000


def test_a_cosine_run_ends_at_the_floor(tmp_path):
    results = training.train(tiny(tmp_path, lr_schedule="cosine", lr_floor=1e-5, epochs=3))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] < 1e-3 and rows[-1]["lr"] == pytest.approx(1e-5)
    assert [r["lr"] for r in rows] == sorted((r["lr"] for r in rows), reverse=True)
    assert results["epochs_trained"] == 3


def test_a_time_budget_shortens_the_schedule(tmp_path):
    """Under --max-minutes the schedule's length is re-estimated from worker 0's step rate after every
    epoch: a clock that says each epoch took 20 of the 60 budgeted seconds makes the schedule end
    after three epochs of the 100 asked for."""
    config = tiny(tmp_path, lr_schedule="exponential", max_minutes=1.0, epochs=100, patience=0)
    run = training.start_run(config, False, distributed.Context(), torch.device("cpu"))
    run.clock = lambda: 20.0 * run.state.epoch
    training.end_epoch(run, training.train_epoch(run))
    steps = run.state.step
    assert run.state.lr_total_steps == pytest.approx(3 * steps)
    training.end_epoch(run, training.train_epoch(run))
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(
        schedules.scheduled_lr("exponential", 1e-3, 1e-5, 2 * steps, 3 * steps)
    )


ALL_ON = {
    "objective": "iwae",
    "train_samples": 3,
    "gradient": "dreg",
    "weight_decay": 0.01,
    "input_noise": 0.1,
    "output_bias_init": True,
    "lr_schedule": "cosine",
    "activation": "gated",
    "dropout": 0.1,
    "posterior_log_var_min": -6.0,
    "posterior_log_var_max": 2.0,
}


def test_every_option_resumes_bit_identically(tmp_path, monkeypatch):
    """A run stopped after one of three epochs and resumed ends with the same weights as one that ran
    straight through (the noise of the encoder's input, the schedule and the optimizer's decay included)."""
    straight = tiny(tmp_path / "a", epochs=3, **ALL_ON)
    training.train(straight)
    split = tiny(tmp_path / "b", epochs=3, **ALL_ON)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "run_is_over", lambda run: run.state.epoch >= 1)
        training.train(split)
    training.train(split, resume=True)
    a = torch.load(Path(straight.out) / "checkpoint.pt", weights_only=True)
    b = torch.load(Path(split.out) / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["config"] == b["config"] | {"out": a["config"]["out"]}
    results = json.loads((Path(split.out) / "results.json").read_text())
    assert results["training_bound"] == {"objective": "iwae", "train_samples": 3, "gradient": "dreg"}


def test_resume_refuses_another_architecture_option_and_applies_a_new_weight_decay(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY_FLAGS, "--epochs", "1", "--dropout", "0.1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", *TINY_FLAGS, "--epochs", "2", "--dropout", "0.2", "--out", str(out), "--resume"]) == 2
    assert "different model: dropout=0.1 there, 0.2 here" in capsys.readouterr().err
    assert main(["train", *TINY_FLAGS, "--epochs", "2", "--weight-decay", "0.05", "--out", str(out), "--resume"]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]} == {0.05}
    assert ckpt["state"]["config_changes"][-1]["weight_decay"] == {"from": 0.0, "to": 0.05}


def test_a_ladder_with_40_plus_40_latents_and_a_vamp_prior_trains_with_iwae(tmp_path):
    results = training.train(
        tiny(
            tmp_path,
            arch="ladder",
            layers=2,
            latent_dim=40,
            prior="vamp",
            pseudo_inputs=7,
            objective="iwae",
            train_samples=2,
            epochs=1,
        )
    )
    assert results["model"]["latent_dim"] == 40 and results["diagnostics"]["units_per_latent"] == {"z1": 40, "z2": 40}
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["model"]["prior.pseudo_logits"].shape == (7, 1, 8, 8)
    assert math.isfinite(results["test"]["nll"])


@pytest.mark.parametrize(
    "options",
    [
        {"gradient": "stl"},
        {"gradient": "stl", "train_samples": 4},
        {
            "objective": "iwae",
            "train_samples": 4,
            "gradient": "dreg",
            "warmup_epochs": 1.0,
            "prior": "vamp",
            "pseudo_inputs": 5,
        },
    ],
)
def test_path_gradient_runs_train_end_to_end(tmp_path, options):
    results = training.train(tiny(tmp_path, epochs=2, **options))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["valid_neg_elbo"] < rows[0]["valid_neg_elbo"] and math.isfinite(results["test"]["nll"])
