"""The model boundary and the hierarchical models: a user's own model, the ladder and ResNet VAEs
through the trainer (free bits per group, EMA, the gradient guard, resume, the CIFAR-10 preset),
and importance sampling against a closed-form log p(x)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from flowvae import objectives, training
from flowvae.config import TrainConfig
from flowvae.config_yaml import load_yaml
from flowvae.evaluation import evaluate
from flowvae.models import MODELS, LatentVariableModel, LogDensities, ModelConfig, build_model, draw_noise
from flowvae.models.base import as_noise
from flowvae.models.likelihoods import Bernoulli, Gaussian
from flowvae.training import epoch, gradient_guard

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LADDER = dict(
    dataset="digits",
    arch="ladder",
    layers=2,
    hidden=32,
    latent_dim=4,
    flow="iaf",
    flow_steps=1,
    flow_hidden=16,
    epochs=3,
    eval_samples=20,
    progress=False,
    threads=1,
)
RESNET = dict(
    dataset="digits",
    arch="resnet",
    layers=2,
    channels=8,
    latent_dim=2,
    flow="iaf",
    flow_steps=1,
    flow_hidden=8,
    epochs=2,
    eval_samples=5,
    progress=False,
    threads=1,
    batch_size=50,
)


def config(tmp_path: Path, base: dict = LADDER, **overrides) -> TrainConfig:
    return TrainConfig.from_dict(base | {"out": str(tmp_path / "run")} | overrides)


# ------------------------------------------------------------- a two-layer linear-Gaussian model


class LinearGaussianHierarchy(LatentVariableModel):
    """z2 ~ N(0, I₂), z1 | z2 ~ N(A z2, s² I₃), x | z1 ~ N(W z1, σ² I₄): log p(x) in closed form.

    q(z2 | x) q(z1 | z2, x) is the exact posterior with its means shifted by ``offset``, so the
    log-weights vary and only their average is exact.  A user's own model: it implements the
    protocol and nothing else."""

    def __init__(self, offset: float = 0.3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(torch.randn(3, 2, generator=g, dtype=torch.float64))
        self.W = nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
        self.s, self.sigma, self.offset = 0.7, 0.5, offset
        self.image_shape, self.likelihood = (1, 2, 2), Gaussian("continuous")

    def joint_covariance(self) -> torch.Tensor:
        """Cov of (z2, z1, x), 9 × 9."""
        A, W = self.A.detach(), self.W.detach()
        c22 = torch.eye(2, dtype=torch.float64)
        c12, c11 = A, A @ A.T + self.s**2 * torch.eye(3, dtype=torch.float64)
        cx2, cx1 = W @ A, W @ c11
        cxx = W @ c11 @ W.T + self.sigma**2 * torch.eye(4, dtype=torch.float64)
        return torch.cat(
            [torch.cat([c22, c12.T, cx2.T], 1), torch.cat([c12, c11, cx1.T], 1), torch.cat([cx2, cx1, cxx], 1)]
        )

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.joint_covariance()[5:, 5:]
        return torch.distributions.MultivariateNormal(torch.zeros(4, dtype=torch.float64), cov).log_prob(x.flatten(1))

    def noise_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"z1": (3,), "z2": (2,)}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def log_densities(self, x, encoded, samples=1, noise=None) -> LogDensities:
        noise = as_noise(self, noise) or draw_noise(self, samples, len(x))
        cov = self.joint_covariance()
        sxx_inv = torch.linalg.inv(cov[5:, 5:])
        mean_z = (cov[:5, 5:] @ sxx_inv @ encoded.T).T  # E[(z2, z1) | x], (B, 5)
        cov_z = cov[:5, :5] - cov[:5, 5:] @ sxx_inv @ cov[5:, :5]
        L = torch.linalg.cholesky(cov_z)
        eps = torch.cat([noise["z2"], noise["z1"]], -1)  # z2 first, as in L's order
        z = mean_z + self.offset + eps @ L.T  # (K, B, 5)
        q = torch.distributions.MultivariateNormal(mean_z + self.offset, scale_tril=L)
        z2, z1 = z[..., :2], z[..., 2:]
        normal = torch.distributions.Normal
        log_p2 = normal(0.0, 1.0).log_prob(z2).sum(-1)
        log_p1 = normal(z2 @ self.A.T, self.s).log_prob(z1).sum(-1)
        log_px = normal(z1 @ self.W.T, self.sigma).log_prob(encoded).sum(-1)
        log_q = q.log_prob(z)
        return LogDensities(log_px, log_p2 + log_p1, log_q, {"z1": z1, "z2": z2})


def test_importance_sampling_converges_to_the_closed_form_log_marginal_and_the_elbo_stays_below():
    model = LinearGaussianHierarchy(offset=0.1)
    x = torch.randn(6, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = model.log_marginal(x)
    g = torch.Generator().manual_seed(2)
    K = 20000
    log_w = model(x, samples=K, noise=draw_noise(model, K, 6, generator=g)).log_weight  # (K, 6)
    w = torch.exp(log_w - log_w.max(0).values)
    standard_error = w.std(0) / (w.mean(0) * math.sqrt(K))  # of log p̂(x)
    iw = -objectives.importance_weighted_nll(model, x, samples=K, chunk_size=3000, generator=g)
    assert ((iw - exact).abs() < 5 * standard_error + 1e-3).all(), (iw - exact, standard_error)
    elbo = log_w.mean(0)
    assert (elbo < exact - 1e-3).all(), "the ELBO is a strict lower bound when q is not the posterior"
    iw_5 = torch.logsumexp(log_w[: 5 * 4000].view(4000, 5, 6), 1).mean(0) - math.log(5)  # E[IWAE-5 bound]
    assert (elbo < iw_5).all() and (iw_5 < exact).all(), "ELBO < IWAE-5 < log p(x)"
    exact_q = LinearGaussianHierarchy(offset=0.0)  # with the true posterior every weight is p(x)
    torch.testing.assert_close(exact_q(x, samples=7).log_weight, exact.expand(7, -1), atol=1e-9, rtol=0)


# ---------------------------------------------------------------------- free bits per group


def test_free_bits_floor_each_group_separately():
    kl = torch.tensor([[[0.05, 3.0], [0.02, 5.0]]], requires_grad=True)  # (K=1, B=2, G=2)
    zeros = torch.zeros(1, 2)
    ld = LogDensities(zeros, -kl.sum(-1), zeros, {"z": torch.zeros(1, 2, 8)}, kl_groups=kl, group_units=(4, 4))
    loss = objectives.training_loss(ld, beta=1.0, free_bits=0.5)
    loss.backward()
    # Group 0's batch-mean KL (0.035) is under its floor of 0.5 · 4 = 2 nats: no gradient; group 1's is not.
    assert torch.equal(kl.grad[..., 0], torch.zeros(1, 2)) and (kl.grad[..., 1] > 0).all()
    assert loss.item() == pytest.approx((2.0 * 2 + 8.0) / 2)  # floors are per group


def test_ladder_and_resnet_report_one_kl_group_per_layer_or_channel():
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.4))
    ladder = build_model(
        ModelConfig(arch="ladder", layers=3, latent_dim=4, hidden=16, flow="iaf", flow_steps=1, flow_hidden=8),
        (1, 8, 8),
        "binary",
    )
    ld = ladder(x, samples=2)
    assert ld.group_names == ("z3", "z2", "z1") and ld.group_units == (4, 4, 4)
    torch.testing.assert_close(ld.kl_groups.sum(-1), ld.kl)
    resnet = build_model(
        ModelConfig(arch="resnet", layers=2, channels=8, latent_dim=3, flow="iaf", flow_steps=1, flow_hidden=8),
        (1, 8, 8),
        "binary",
    )
    ld = resnet(x, samples=2)
    assert len(ld.group_names) == 2 * 3 and set(ld.group_units) == {1}
    torch.testing.assert_close(ld.kl_groups.sum(-1), ld.kl, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------- through the trainer


def test_ladder_trains_with_ema_evaluation_and_per_layer_diagnostics(tmp_path):
    results = training.train(config(tmp_path, ema=0.9, free_bits=0.05))
    run = tmp_path / "run"
    best = torch.load(run / "best.pt", weights_only=True)["model"]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    raw = ckpt["model"]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw), "the EMA differs from the raw weights"
    assert all(torch.equal(best[k], ema[k]) for k in best), "best.pt holds the EMA weights that were evaluated"
    assert set(results["test"]["kl_groups"]) == {"z1", "z2"}
    assert results["diagnostics"]["units_per_latent"] == {"z1": 4, "z2": 4}
    assert math.isfinite(results["test"]["nll"]) and results["test"]["nll"] <= results["test"]["neg_elbo"] + 1.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"valid_kl_z1", "valid_kl_z2", "skipped_updates"} <= set(rows[-1])


def test_gradient_guard_skips_a_nan_update_counts_it_and_training_goes_on(tmp_path, monkeypatch):
    real_loss, calls = objectives.training_loss, []

    def poisoned(*args, **kwargs):  # the 5th step's loss (and so its gradient) is NaN
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    snapshots = []
    real_guard = epoch.guarded_step

    def watched(run, loss):
        before = [p.detach().clone() for p in run.model.parameters()]
        made = bool(real_guard(run, loss))
        snapshots.append((made, all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))))
        return made

    monkeypatch.setattr(objectives, "training_loss", poisoned)
    monkeypatch.setattr(epoch, "guarded_step", watched)
    results = training.train(config(tmp_path, epochs=2))
    assert snapshots[4] == (False, True), "the NaN step was skipped and left the parameters unchanged"
    assert all(made and not unchanged for made, unchanged in snapshots[5:]), "later steps update again"
    assert results["skipped_updates"] == 1 and math.isfinite(results["test"]["nll"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_updates"] == 1


def test_gradient_guard_skips_a_spike_but_a_lasting_change_of_scale_never_stalls(tmp_path, monkeypatch):
    monkeypatch.setattr(gradient_guard, "WARMUP_STEPS", 3)
    real_loss, calls = objectives.training_loss, []

    def scaled(*args, **kwargs):  # from step 10 on, every gradient is 1e4 times larger, for good
        calls.append(1)
        return real_loss(*args, **kwargs) * (1e4 if len(calls) >= 10 else 1.0)

    monkeypatch.setattr(objectives, "training_loss", scaled)
    results = training.train(config(tmp_path, epochs=8, batch_size=50, grad_skip=50.0, lr=1e-4, patience=0))
    skipped = results["skipped_updates"]
    steps = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["state"]["step"]
    assert 1 <= skipped < steps - 10, f"{skipped} of {steps} updates skipped: spikes skipped, training not stalled"


def test_ladder_resumes_bit_identically(tmp_path):
    straight = config(tmp_path / "a", epochs=4)
    training.train(straight)
    halves = config(tmp_path / "b", epochs=2)
    training.train(halves)
    halves.epochs = 4
    training.train(halves, resume=True)
    a = torch.load(Path(straight.out) / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(Path(halves.out) / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resnet_trains_resumes_bit_identically_and_reports_groups(tmp_path):
    # On the CPU: CUDA convolutions repeat exactly only with --deterministic.
    straight = config(tmp_path / "a", RESNET, epochs=2, device="cpu")
    results = training.train(straight)
    assert len(results["test"]["kl_groups"]) == 2 * 2 and math.isfinite(results["test"]["nll"])
    halves = config(tmp_path / "b", RESNET, epochs=1, device="cpu")
    training.train(halves)
    halves.epochs = 2
    training.train(halves, resume=True)
    a = torch.load(Path(straight.out) / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(Path(halves.out) / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


class TinyUserVAE(LatentVariableModel):
    """A user's own model: a linear encoder and decoder, Bernoulli pixels, written only against the protocol."""

    def __init__(self, image_shape, latent: int = 3) -> None:
        super().__init__()
        pixels = math.prod(image_shape)
        self.image_shape, self.likelihood, self.latent = tuple(image_shape), Bernoulli(), latent
        self.enc, self.dec = nn.Linear(pixels, 2 * latent), nn.Linear(latent, pixels)

    def noise_shapes(self):
        return {"eps": (self.latent,)}

    def encode(self, x):
        return self.enc(x.flatten(1)).chunk(2, -1)

    def log_densities(self, x, encoded, samples=1, noise=None):
        mean, log_std = encoded
        eps = noise["eps"] if noise is not None else torch.randn(samples, *mean.shape, device=mean.device)
        z = mean + log_std.exp() * eps
        normal = torch.distributions.Normal
        log_q = normal(mean, log_std.exp()).log_prob(z).sum(-1)
        logits = self.dec(z).unflatten(-1, self.image_shape)
        return LogDensities(self.likelihood.log_prob(logits, x), normal(0.0, 1.0).log_prob(z).sum(-1), log_q, {"z": z})

    def sample(self, n, generator=None):
        z = torch.randn(n, self.latent, generator=generator, device=self.dec.weight.device)
        return torch.sigmoid(self.dec(z).unflatten(-1, self.image_shape))

    def reconstruct(self, x):
        return torch.sigmoid(self.dec(self.encode(x)[0]).unflatten(-1, self.image_shape))


MODELS.register("tiny-user-vae")(lambda cfg, shape, kind: TinyUserVAE(shape, cfg.latent_dim))


def test_a_users_own_model_trains_with_the_trainers_machinery(tmp_path):
    results = training.train(config(tmp_path, arch="tiny-user-vae", flow="none", latent_dim=3, epochs=2))
    assert results["model"]["arch"] == "tiny-user-vae" and math.isfinite(results["test"]["nll"])
    assert results["diagnostics"]["units_per_latent"] == {"z": 3}
    training.train(config(tmp_path, arch="tiny-user-vae", flow="none", latent_dim=3, epochs=3), resume=True)


def test_priors_train_and_resume_in_the_ladder(tmp_path):
    for prior in ("flow", "vamp"):
        cfg = config(tmp_path / prior, prior=prior, pseudo_inputs=10, prior_flow_steps=1, epochs=1)
        results = training.train(cfg)
        assert math.isfinite(results["test"]["nll"]) and results["model"]["prior"] == prior
        cfg.epochs = 2
        training.train(cfg, resume=True)
        with pytest.raises(training.CheckpointError, match="prior"):
            training.train(config(tmp_path / prior, prior="standard", epochs=3), resume=True)


# ------------------------------------------------------------------------------- the presets


def test_presets_are_valid_configs():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = TrainConfig.from_dict(load_yaml(path), source=str(path))
        cfg.device = "cpu"
        cfg.validate()
        assert cfg.model.arch in ("ladder", "resnet"), path


def test_the_best_cpu_preset_is_the_committed_run_it_quotes():
    """configs/mnist_cpu_best.yaml trains exactly as the run under benchmarks/results/mnist_cpu_best/
    did: only where the run went, its test K and its progress bar may differ."""
    preset = TrainConfig.from_dict(load_yaml(CONFIGS / "mnist_cpu_best.yaml")).to_dict()
    run = TrainConfig.from_dict(load_yaml(CONFIGS.parent / "benchmarks/results/mnist_cpu_best/config.yaml")).to_dict()
    differing = {name for name in preset if preset[name] != run[name]}
    assert differing <= {"out", "data_dir", "eval_samples", "progress"}, differing


def test_cifar10_preset_runs_end_to_end_on_small_synthetic_files(tmp_path, monkeypatch):
    from flowvae.data import cifar10

    from test_data import cifar_batch, fake_cifar  # the CIFAR-shaped tarball writers of the data tests

    monkeypatch.setattr(cifar10, "TAR_SHA256", None)
    monkeypatch.setattr(cifar10, "ROWS_PER_BATCH", 4)
    monkeypatch.setattr(cifar10, "N_VALID", 4)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    batches = {f"data_batch_{i}": cifar_batch(4, 10 * i) for i in range(1, 6)}
    fake_cifar(data_dir / "cifar-10-python.tar.gz", **batches, test_batch=cifar_batch(4, 99))
    preset = load_yaml(CONFIGS / "cifar10_resnet_iaf.yaml")
    preset["model"] |= {"layers": 2, "channels": 8, "latent_dim": 4, "flow_hidden": 8}  # the preset, shrunk for a CPU
    cfg = TrainConfig.from_dict(
        preset
        | {
            "data_dir": str(data_dir),
            "out": str(tmp_path / "run"),
            "device": "cpu",
            "precision": "fp32",
            "compile": False,
            "batch_size": 8,
            "epochs": 1,
            "eval_samples": 3,
            "eval_batch_size": 4,
            "progress": False,
            "threads": 1,
        }
    )
    results = training.train(cfg)
    assert results["model"]["likelihood"] == "discretized_logistic" and cfg.optimizer == "adamax"
    assert 0 < results["test"]["bits_per_dim"] < 20 and math.isfinite(results["test"]["neg_elbo_bits_per_dim"])
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0
    model = build_model(cfg.model, (3, 32, 32), "8bit")
    again = evaluate(model, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), samples=2)
    assert "bits_per_dim" in again
