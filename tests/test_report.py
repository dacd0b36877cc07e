"""Figures and tables of runs: curves, compare, the 2-D posterior against closed forms, manifold, TensorBoard."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from flowvae import report, training
from flowvae.cli import main
from flowvae.config import TrainConfig
from flowvae.distributions import FlowDistribution, diagonal_gaussian
from flowvae.flows import build_flow
from flowvae.models import build_vae

PNG = b"\x89PNG\r\n\x1a\n"
TINY = dict(
    dataset="digits",
    hidden=32,
    latent_dim=2,
    flow="planar",
    flow_steps=2,
    epochs=2,
    eval_samples=10,
    progress=False,
    threads=1,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny 2-D runs on digits: planar×2, and a diagonal Gaussian with a KL warm-up for 3 epochs."""
    root = tmp_path_factory.mktemp("runs")
    planar, diagonal = root / "planar", root / "diagonal"
    training.train(TrainConfig.from_dict(TINY | {"out": str(planar)}))
    training.train(TrainConfig.from_dict(TINY | dict(flow="none", epochs=3, warmup_epochs=1.5, out=str(diagonal))))
    return planar, diagonal


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------------------------
# curves


def test_curves_command_draws_the_runs_metrics(runs, tmp_path, capsys):
    planar, _ = runs
    assert main(["curves", str(planar)]) == 0
    assert (planar / "curves.png").read_bytes()[:8] == PNG
    assert main(["curves", str(planar), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    assert main(["curves", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in _one_line_error(capsys)


def test_metrics_csv_and_jsonl_read_the_same_and_lr_changes_are_found(runs, tmp_path):
    _, diagonal = runs
    from_csv = report.read_metrics(diagonal / "metrics.csv")
    from_jsonl = report.read_metrics(diagonal / "metrics.jsonl")
    assert from_csv == from_jsonl and [r["epoch"] for r in from_csv] == [1, 2, 3]
    assert from_csv[0]["beta"] < 1.0  # the warm-up shows on the β axis
    rows = [
        {
            "epoch": e,
            "train_loss": 50 - e,
            "valid_neg_elbo": 52 - e,
            "valid_kl": 3.0,
            "valid_kl_group1": 1.0,
            "lr": lr,
            "future_key": "x",
        }
        for e, lr in zip(range(1, 9), [1e-3] * 3 + [5e-4] * 4 + [2.5e-4])
    ]
    assert report.lr_changes(rows) == [(3.0, 5e-4), (7.0, 2.5e-4)]
    report.plot_curves(rows, tmp_path / "curves.png")  # no beta or reconstruction column: drawn without them
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="no metrics rows"):
        report.plot_curves([], tmp_path / "empty.png")


# ----------------------------------------------------------------------------------------------
# compare


def test_compare_puts_differing_fields_first_in_markdown_and_csv(runs, tmp_path, capsys):
    planar, diagonal = runs
    table, plot = tmp_path / "table.csv", tmp_path / "valid.png"
    assert main(["compare", str(planar), str(diagonal), "--csv", str(table), "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:4] == ["run", "model.flow", "epochs", "warmup_epochs"]  # in config order; out is the run column
    assert header[4:8] == ["train −ELBO", "valid −ELBO", "test −ELBO", "test −log p(x)"]
    assert "bits/dim" not in header  # no run has it
    results = json.loads((planar / "results.json").read_text())
    first = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert first[:4] == [str(planar), "planar", "2", "0.0"]
    assert first[header.index("test −log p(x)")] == f"{results['test']['nll']:.2f}"
    assert first[header.index("parameters")] == f"{results['parameters']:,}"
    assert any(line.startswith("same in every run: dataset=digits") for line in lines)

    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    columns = list(rows[0])
    assert columns[:4] == ["run", "model.flow", "epochs", "warmup_epochs"] and "dataset" in columns[4:]
    assert float(rows[1]["test_nll"]) == json.loads((diagonal / "results.json").read_text())["test"]["nll"]
    assert rows[1]["epochs_trained"] == "3" and rows[0]["model.latent_dim"] == "2"
    assert plot.read_bytes()[:8] == PNG


def test_compare_flattens_nested_configs_and_shows_a_run_still_training(tmp_path):
    for name, flow in (("a", "iaf"), ("b", "planar")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(
            yaml.safe_dump({"model": {"latent_dim": 2, "flow": flow}, "lr": 1e-3}, sort_keys=False)
        )
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "valid_neg_elbo": 40.0}) + "\n")
    (tmp_path / "a" / "results.json").write_text(json.dumps({"test": {"nll": 30.0, "bits_per_dim": 0.5}}))
    comparison = report.compare_runs([tmp_path / "a", tmp_path / "b"])
    assert comparison.differing == ["model.flow"] and comparison.shared == ["model.latent_dim", "lr"]
    assert comparison.results == ["test_nll", "bits_per_dim", "epochs_trained"]
    assert comparison.runs[1].results["epochs_trained"] == 1  # from metrics: no results.json yet
    markdown = comparison.markdown()
    assert "| iaf | 30.00 | 0.500 | 1 |" in markdown and "| planar |  |  | 1 |" in markdown


@pytest.mark.parametrize(
    "problem,message",
    [
        ("missing", "run directory {run} does not exist"),
        ("no_config", "{run} is not a flowvae run directory (no config.yaml)"),
        ("bad_results", "{run}: results.json is unreadable"),
        ("bad_yaml", "is not valid YAML"),
    ],
)
def test_compare_errors_name_the_directory(runs, tmp_path, capsys, problem, message):
    run = tmp_path / "broken"
    if problem != "missing":
        run.mkdir()
    if problem == "bad_results":
        (run / "config.yaml").write_text("flow: iaf\n")
        (run / "results.json").write_text("{not json")
    if problem == "bad_yaml":
        (run / "config.yaml").write_text("flow: [iaf\n")
    assert main(["compare", str(runs[0]), str(run)]) == 2
    err = _one_line_error(capsys)
    assert message.format(run=run) in err and str(run) in err


# ----------------------------------------------------------------------------------------------
# the posterior


class FixedGaussian:
    """x | z ~ N(params, σ² I), summed over (C, H, W)."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(params, self.sigma).log_prob(x).flatten(-3).sum(-1)


class LinearGaussianVAE(nn.Module):
    """z ~ N(0, I₂), x | z ~ N(W z + b, σ² I), so p(z|x) is Gaussian; q is a given Gaussian, maybe pushed
    through a flow with a given context."""

    latent_dim = 2

    def __init__(self, q_mean: torch.Tensor, q_std: torch.Tensor, flow=None, context=None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.W = nn.Parameter(torch.randn(3, 2, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
        self.likelihood, self.sigma = FixedGaussian(0.7), 0.7
        self.q_mean, self.q_std, self.flow, self.context = q_mean, q_std, flow, context

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.W.T + self.b).reshape(*z.shape[:-1], 1, 1, 3)

    def posterior(self, x: torch.Tensor) -> FlowDistribution:
        return FlowDistribution(diagonal_gaussian(self.q_mean, self.q_std.log()), self.flow, self.context)

    def exact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """p(z|x) = N(μ, Σ) and log p(x) for one image x (1, 1, 3)."""
        W, s2 = self.W.detach(), self.sigma**2
        cov = torch.linalg.inv(torch.eye(2, dtype=W.dtype) + W.T @ W / s2)
        mean = cov @ W.T @ (x.reshape(3) - self.b.detach()) / s2
        marginal = torch.distributions.MultivariateNormal(self.b.detach(), W @ W.T + s2 * torch.eye(3, dtype=W.dtype))
        return mean, cov, marginal.log_prob(x.reshape(3)).item()


def _gaussian_kl(m: torch.Tensor, s: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> float:
    """KL(N(m, diag s²) ‖ N(μ, Σ))."""
    precision, diff = torch.linalg.inv(cov), mu - m
    return (
        0.5
        * (
            torch.trace(precision @ torch.diag(s**2))
            + diff @ precision @ diff
            - 2
            + torch.logdet(cov)
            - torch.log(s**2).sum()
        ).item()
    )


@pytest.mark.parametrize("box", [None, (-4.0, 4.0, -4.0, 4.0)], ids=["auto_box", "given_box"])
def test_posterior_grid_matches_the_linear_gaussian_closed_form(box):
    x = torch.tensor([[[[0.8, -1.5, 0.3]]], [[[-0.2, 0.4, 2.0]]]], dtype=torch.float64)
    model = LinearGaussianVAE(torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))
    exact = [model.exact(x[b]) for b in range(2)]
    # q: a diagonal Gaussian near, not at, the true posterior, so the KL is well above its MC error
    model.q_mean = torch.stack([mu + torch.tensor([0.3, -0.2], dtype=torch.float64) for mu, _, _ in exact])
    model.q_std = torch.stack(
        [cov.diagonal().sqrt() * torch.tensor([1.3, 0.8], dtype=torch.float64) for _, cov, _ in exact]
    )
    grids = report.posterior_grid(model, x, grid=150, samples=20000, box=box)
    for b, (g, (mu, cov, log_px)) in enumerate(zip(grids, exact)):
        area = (g.z1[1] - g.z1[0]) * (g.z2[1] - g.z2[0])
        assert torch.exp(g.log_posterior).sum().item() * area.item() == pytest.approx(1.0, abs=1e-3)
        assert g.log_px == pytest.approx(log_px, abs=1e-3)
        points = torch.stack(torch.meshgrid(g.z1, g.z2, indexing="xy"), -1)
        truth = torch.distributions.MultivariateNormal(mu, cov).log_prob(points)
        near = truth > truth.max() - 8
        assert torch.allclose(g.log_posterior[near], truth[near], atol=1e-4)  # the box holds all but ~1e-4
        kl = _gaussian_kl(model.q_mean[b], model.q_std[b], mu, cov)
        assert kl > 0.1 and abs(g.kl - kl) < 4 * g.kl_stderr + 1e-3, (g.kl, g.kl_stderr, kl)
        q = torch.distributions.Normal(model.q_mean[b], model.q_std[b])
        assert torch.allclose(g.log_q, q.log_prob(g.q_points).sum(-1), atol=1e-9)


def test_q_on_the_warped_mesh_is_the_flows_exact_density():
    """Pushed forward through a conditional IAF (which has an inverse to check against), log q on the
    mesh equals log q computed the other way, by inverting the flow."""
    torch.manual_seed(0)
    flow = build_flow("iaf", 2, 2, context_dim=3, hidden=8).double()
    context = torch.randn(2, 3, dtype=torch.float64)
    model = LinearGaussianVAE(
        torch.randn(2, 2, dtype=torch.float64), torch.rand(2, 2, dtype=torch.float64) + 0.3, flow, context
    )
    x = torch.zeros(2, 1, 1, 3, dtype=torch.float64)
    grids = report.posterior_grid(model, x, grid=30, samples=500)
    for b, g in enumerate(grids):
        q = FlowDistribution(diagonal_gaussian(model.q_mean[b], model.q_std[b].log()), flow, context[b])
        with torch.no_grad():
            assert torch.allclose(g.log_q, q.log_prob(g.q_points), atol=1e-8)
        assert g.kl > -4 * g.kl_stderr


def test_posterior_command_draws_the_figure(runs, tmp_path, capsys):
    planar, _ = runs
    out = tmp_path / "posterior.png"
    assert (
        main(["posterior", "--run", str(planar), "--n", "2", "--grid", "40", "--samples", "200", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG and printed.count("KL(q‖p(z|x))") == 2 and "(MC, 200 samples)" in printed


def test_posterior_refuses_a_latent_that_is_not_2d(runs, tmp_path, capsys):
    config = yaml.safe_load((runs[0] / "config.yaml").read_text())
    config["model"]["latent_dim"] = 4
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["posterior", "--run", str(tmp_path)]) == 2
    assert "latent_dim=4; the posterior can be drawn for a 2-D latent only" in _one_line_error(capsys)
    with pytest.raises(ValueError, match="2-D latent only"):
        report.posterior_grid(build_vae("mlp", (1, 8, 8), 3, hidden=8), torch.zeros(1, 1, 8, 8))


# ----------------------------------------------------------------------------------------------
# manifold


def test_manifold_grid_and_traversal_decode_the_prior_quantiles(runs, tmp_path):
    assert main(["manifold", "--run", str(runs[0]), "--n", "5", "--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG

    values = report.prior_quantiles(5)
    assert values[2] == 0 and values[4].item() == pytest.approx(
        torch.distributions.Normal(0, 1).icdf(torch.tensor(0.9)).item(), abs=1e-6
    )
    model = build_vae("mlp", (1, 8, 8), 2, hidden=8).eval()
    images, _ = report.manifold_images(model, 5)
    with torch.no_grad():  # row 0 is the top (largest z2), column 4 the largest z1
        corner = torch.sigmoid(model.decode(torch.tensor([[values[4], values[4]]], dtype=torch.float32)))
    assert torch.allclose(images[4], corner[0], atol=1e-6)
    model = build_vae("mlp", (1, 8, 8), 5, hidden=8).eval()
    images, _ = report.traversal_images(model, 5, dims=3)
    with torch.no_grad():  # row 1, column 0: z2 at the lowest quantile, the rest 0
        z = torch.zeros(1, 5)
        z[0, 1] = values[0]
        assert images.shape == (15, 1, 8, 8) and torch.allclose(images[5], torch.sigmoid(model.decode(z))[0])
    report.plot_manifold(model, tmp_path / "traversal.png", n=5, dims=3)
    assert (tmp_path / "traversal.png").read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------------------------
# TensorBoard


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_logger_writes_scalars_images_and_figures(tmp_path):
    pytest.importorskip("tensorboard")
    from flowvae.training.tensorboard import TensorBoardLogger

    with TensorBoardLogger(tmp_path) as logger:
        for step in (1, 2, 3):
            logger.scalars(step, {"train/loss": 10.0 / step, "train/lr": torch.tensor(1e-3)})
        logger.images("samples", torch.rand(4, 1, 8, 8), 3)
        fig = report.new_figure(2, 2)
        fig.subplots().plot([0, 1])
        logger.figure("valid/curves", fig, 3)
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            logger.images("bad", torch.rand(8, 8), 3)
    events = _events(tmp_path)
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr"}
    assert set(events.Tags()["images"]) == {"samples", "valid/curves"}
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(1, 10.0), (2, 5.0), (3, pytest.approx(10 / 3))]
    assert [e.step for e in events.Images("samples")] == [3]


def test_tensorboard_resume_continues_the_stream_without_duplicate_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from flowvae.training.tensorboard import TensorBoardLogger

    crashed = TensorBoardLogger(tmp_path)
    for step in range(1, 10):  # checkpoint after step 7, events up to 9 written, then killed
        crashed.scalars(step, {"train/loss": float(step)})
    crashed.flush()  # a killed process closes nothing
    resumed = TensorBoardLogger(tmp_path, resume_step=8)
    for step in range(8, 11):
        resumed.scalars(step, {"train/loss": 100.0 + step})
    resumed.close()
    steps = [(e.step, e.value) for e in _events(tmp_path).Scalars("train/loss")]
    assert steps == [(s, float(s)) for s in range(1, 8)] + [(s, 100.0 + s) for s in range(8, 11)]


def test_tensorboard_missing_package_is_a_one_line_install_hint(tmp_path, monkeypatch):
    from flowvae.training.tensorboard import TensorBoardLogger, TensorBoardUnavailable

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(ImportError) as info:
        TensorBoardLogger(tmp_path)
    assert isinstance(info.value, TensorBoardUnavailable)
    message = str(info.value)
    assert 'pip install "flowvae[tensorboard]"' in message and "\n" not in message
    assert not (tmp_path / "tensorboard").exists()
