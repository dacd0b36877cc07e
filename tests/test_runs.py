"""Runs are self-contained for inference; ``flowvae.fit`` and ``flowvae.load_run`` from Python.

Tiny models on tiny data, one epoch each: what is checked is the plumbing (what a run records, what
loads without the data, that numbers agree with ``results.json``), not how well they train.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny_runs
import torch
from PIL import Image
from torch import nn

import flowvae
from flowvae.cli import main
from flowvae.config import ConfigError
from flowvae.data import DataError
from flowvae.models import VAE, GaussianEncoder, build_likelihood
from flowvae.training import CheckpointError

TINY = tiny_runs.SMALLEST | dict(hidden=16, eval_samples=5, batch_size=50, eval_batch_size=50)
QUICK = tiny_runs.flags(TINY)


def binary_images(n: int, side: int = 8, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, side, side)) > 0.5).astype(np.uint8)


def test_fit_on_arrays_and_load_run_gives_results_json(tmp_path: Path) -> None:
    x = binary_images(200)
    model, run = flowvae.fit(train=x[:150], test=x[150:], out=str(tmp_path / "run"), **TINY)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert run.results == results and results["data"]["image_shape"] == [1, 8, 8]
    assert results["data"]["sizes"] == {"train": 135, "valid": 15, "test": 50}
    assert run.data["kind"] == "binary" and run.image_shape == (1, 8, 8) and not model.training
    np.save(tmp_path / "test.npy", x[150:])
    loaded = flowvae.load_run(tmp_path / "run")
    assert loaded.evaluate("test", path=tmp_path / "test.npy") == results["test"]
    assert loaded.evaluate("valid", path=tmp_path / "test.npy")["neg_elbo"] != results["valid"]["neg_elbo"]
    for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(DataError, match="arrays given to flowvae.fit"):
        loaded.evaluate("test")  # the arrays are not kept: a one-line error saying what to give
    last = flowvae.load_run(tmp_path / "run", checkpoint="last", device="cpu")
    assert last.checkpoint == "last" and last.device == torch.device("cpu")
    with pytest.raises(ValueError, match="'best' or 'last'"):
        flowvae.load_run(tmp_path / "run", checkpoint="final")
    with pytest.raises(ConfigError, match="no config.yaml"):
        flowvae.load_run(tmp_path)


def test_fit_on_a_path_and_on_tensors_with_options(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", binary_images(120))
    _, run = flowvae.fit(train=tmp_path / "x.npy", out=str(tmp_path / "a"), valid_fraction=0.25, **TINY)
    assert run.data["sizes"] == {"train": 78, "valid": 30, "test": 12}
    assert flowvae.load_run(tmp_path / "a").evaluate("test") == run.results["test"]  # reads the path again
    gray = torch.rand(100, 1, 6, 6)
    _, g = flowvae.fit({"flow": "planar", "flow_steps": 2}, train=gray, out=str(tmp_path / "g"), **TINY)
    assert g.kind == "grayscale" and g.config.model.flow == "planar"
    with pytest.raises(DataError, match="fit no data kind"):
        flowvae.fit(train=gray * 3, out=str(tmp_path / "bad"), **TINY)
    with pytest.raises(ConfigError, match="unknown config key"):
        flowvae.fit(train=gray, out=str(tmp_path / "bad"), epoch=3)
    assert not (tmp_path / "bad").exists()


class TinyVAE(VAE):
    """A user's own model class (here a VAE with its own encoder and decoder)."""

    def __init__(self) -> None:
        body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ELU())
        decoder = nn.Sequential(nn.Linear(2, 32), nn.ELU(), nn.Linear(32, 64), nn.Unflatten(1, (1, 8, 8)))
        super().__init__(
            GaussianEncoder(body, feature_dim=32, latent_dim=2),
            decoder,
            build_likelihood("bernoulli", "binary"),
            2,
            image_shape=(1, 8, 8),
        )


def test_fit_trains_a_users_own_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mine = TinyVAE()
    before = [p.detach().clone() for p in mine.parameters()]
    model, run = flowvae.fit(mine, train=binary_images(150), out=str(tmp_path / "mine"), **TINY)
    assert model is mine and any(not torch.equal(a, b) for a, b in zip(before, mine.parameters()))
    assert run.data["model_class"].endswith("TinyVAE")
    with pytest.raises(CheckpointError, match="model of your own.*model="):
        flowvae.load_run(tmp_path / "mine")
    again = flowvae.load_run(tmp_path / "mine", model=TinyVAE())
    for a, b in zip(again.model.parameters(), mine.parameters()):
        assert torch.equal(a, b)


def test_cli_run_works_after_its_data_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pngs").mkdir()
    for i, x in enumerate(binary_images(100)):
        Image.fromarray(x * 255).save(tmp_path / "pngs" / f"{i:03d}.png")
    assert main(["train", "--dataset", "pngs", *QUICK, "--out", "run"]) == 0
    shutil.rmtree(tmp_path / "pngs")
    np.save("other.npy", binary_images(30, seed=1))
    np.save("small.npy", binary_images(30, side=6))
    np.save("gray.npy", np.full((30, 8, 8), 0.5, dtype=np.float32))
    capsys.readouterr()
    assert main(["sample", "--run", "run", "--n", "4", "--out", "s.png"]) == 0
    assert main(["manifold", "--run", "run", "--n", "3", "--out", "m.png"]) == 0
    assert (
        main(
            [
                "posterior",
                "--run",
                "run",
                "--data",
                "other.npy",
                "--n",
                "1",
                "--grid",
                "16",
                "--samples",
                "10",
                "--out",
                "p.png",
            ]
        )
        == 0
    )
    assert main(["evaluate", "--run", "run", "--data", "other.npy", "--samples", "3", "--output", "e.json"]) == 0
    assert json.loads(Path("e.json").read_text())["points"] == 30
    assert main(["evaluate", "--run", "run", "--data", "digits", "--samples", "2", "--output", "d.json"]) == 0
    assert json.loads(Path("d.json").read_text())["points"] == 250  # a registered data set's test split
    assert all(Path(name).is_file() for name in ("s.png", "m.png", "p.png"))
    capsys.readouterr()
    for argv, expected in (
        (["evaluate", "--run", "run"], "the run's own data cannot be read"),
        (["evaluate", "--run", "run", "--data", "small.npy"], "shape (1, 6, 6) (C, H, W) but the run was trained on"),
        (["evaluate", "--run", "run", "--data", "gray.npy"], "binary needs values 0 and 1"),
        (["evaluate", "--run", "run", "--data", "none.npy"], "none.npy does not exist"),
        (["evaluate", "--run", "run", "--data", "nosuchset"], "unknown dataset 'nosuchset'"),
        (["posterior", "--run", "run", "--data", "small.npy", "--out", "q.png"], "shape (1, 6, 6)"),
    ):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and expected in err, err
    assert not Path("q.png").exists()


def test_runs_without_recorded_data_still_load(tmp_path: Path) -> None:
    """A run written before checkpoints recorded the data: its data set gives the shape."""
    _, run = flowvae.fit(train=str(_digits_npy(tmp_path)), out=str(tmp_path / "old"), **TINY)
    best = torch.load(tmp_path / "old" / "best.pt", weights_only=True)
    del best["data"]
    torch.save(best, tmp_path / "old" / "best.pt")
    assert flowvae.load_run(tmp_path / "old").evaluate("test") == run.results["test"]


def _digits_npy(root: Path) -> Path:
    np.save(root / "d.npy", binary_images(80, seed=3))
    return root / "d.npy"


def test_fit_resumes_with_the_same_arrays(tmp_path: Path) -> None:
    x = binary_images(120)
    flowvae.fit(train=x, out=str(tmp_path / "r"), **TINY)
    with pytest.raises(CheckpointError, match="already holds a run"):
        flowvae.fit(train=x, out=str(tmp_path / "r"), **TINY)
    _, run = flowvae.fit(train=x, out=str(tmp_path / "r"), resume=True, **(TINY | {"epochs": 2}))
    assert run.results["epochs_trained"] == 2
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
