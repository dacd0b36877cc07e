"""The trainer and the command line: artifacts, kill-and-resume, bad input, each subcommand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_runs
import torch
import yaml

from flowvae import training
from flowvae.cli import main
from flowvae.config import ConfigError, TrainConfig
from flowvae.data import DataError, DatasetSplits
from flowvae.models import build_model
from flowvae.training import epoch, safeguards, setup

TINY = tiny_runs.DIGITS_IAF | dict(epochs=3)
TINY_FLAGS = tiny_runs.flags(tiny_runs.DIGITS_IAF)


def tiny(tmp_path: Path, **overrides) -> TrainConfig:
    return TrainConfig.from_dict(TINY | {"out": str(tmp_path / "run")} | overrides)


def test_train_writes_every_artifact(tmp_path):
    results = training.train(tiny(tmp_path, warmup_epochs=1.5, free_bits=0.01))
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "checkpoint.pt",
        "best.pt",
        "metrics.jsonl",
        "metrics.csv",
        "samples.png",
        "reconstructions.png",
        "results.json",
    ):
        assert (run / name).stat().st_size > 0, name
    assert json.loads((run / "results.json").read_text()) == json.loads(json.dumps(results))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["beta"] < 1.0 and rows[-1]["beta"] == 1.0  # KL warm-up over 1.5 epochs
    test = results["test"]
    assert test["nll_samples"] == 20 and 0 < test["nll"] <= test["neg_elbo"] + 1.0
    assert 0 <= results["diagnostics"]["active_units"] <= 4 and results["diagnostics"]["units_per_latent"] == {"z": 4}
    assert results["test"]["kl_groups"]["z"] == pytest.approx(results["test"]["kl"])
    assert results["objective"] == {"warmup_epochs": 1.5, "free_bits": 0.01}
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["flow"] == "iaf"


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_killed_run_resumes_to_bit_identical_parameters(tmp_path):
    straight = tiny(tmp_path / "a", epochs=12)
    training.train(straight)

    out = tmp_path / "b" / "run"
    cmd = [sys.executable, "-m", "flowvae", "train", *TINY_FLAGS, "--epochs", "12", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists(), "the run should have been killed before it finished"
    done = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["epoch"]  # the logs are rebuilt from it
    assert 1 <= done < 12
    assert main(["train", *TINY_FLAGS, "--epochs", "12", "--out", str(out), "--resume"]) == 0

    a, b = _model_tensors(Path(straight.out) / "checkpoint.pt"), _model_tensors(out / "checkpoint.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = [json.loads(line) for line in (Path(straight.out) / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)
    assert not list(out.glob(".*tmp")), "no temporary files left behind"


def test_resume_removes_temporaries_of_an_interrupted_write(tmp_path):
    config = tiny(tmp_path, epochs=1, eval_samples=2)
    training.train(config)
    stale = Path(config.out) / ".metrics.csv.abc123.flowvae-tmp"
    stale.write_text("half a file")
    users_own = Path(config.out) / ".my-notes.tmp"
    users_own.write_text("a user's file that merely looks temporary")
    config.epochs = 2
    training.train(config, resume=True)
    assert not stale.exists() and (Path(config.out) / "metrics.csv").read_text().count("\n") == 3
    assert users_own.read_text().startswith("a user's file")


def test_resume_can_extend_training(tmp_path):
    config = tiny(tmp_path, epochs=2)
    training.train(config)
    config.epochs = 4
    results = training.train(config, resume=True)
    assert results["epochs_trained"] == 4


def test_checkpoint_problems_are_one_line_errors(tmp_path):
    config = tiny(tmp_path, epochs=1, eval_samples=2)
    training.train(config)
    with pytest.raises(training.CheckpointError, match="already holds a run"):
        training.train(config)
    other = tiny(tmp_path, epochs=1, flow="planar")
    with pytest.raises(training.CheckpointError, match="different model: flow='iaf' there, 'planar' here"):
        training.train(other, resume=True)
    with pytest.raises(training.CheckpointError, match="flow_context=True there, False here"):
        training.train(tiny(tmp_path, epochs=1, flow_context=False), resume=True)
    saved = torch.load(Path(config.out) / "checkpoint.pt", weights_only=True)
    # A format-1 checkpoint (flat config, from before hierarchical models and flow_context) still loads.
    flat = TrainConfig.from_dict(saved["config"]).flat()
    for key in (
        "flow_context",
        "layers",
        "channels",
        "rank",
        "prior",
        "prior_flow",
        "prior_flow_steps",
        "pseudo_inputs",
        "optimizer",
        "ema",
        "grad_skip",
    ):
        del flat[key]
    saved["config"], saved["format"] = flat, 1
    torch.save(saved, tmp_path / "old.pt")
    assert training.load_checkpoint(tmp_path / "old.pt", config)["config"]["flow"] == "iaf"
    ckpt = Path(config.out) / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(training.CheckpointError, match="corrupt, truncated"):
        training.train(config, resume=True)
    ckpt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(training.CheckpointError, match="corrupt, truncated"):
        training.load_checkpoint(ckpt)
    with pytest.raises(training.CheckpointError, match="does not exist"):
        training.train(tiny(tmp_path / "fresh"), resume=True)


def test_a_planar_run_saved_as_one_step_modules_evaluates_and_refuses_to_resume_clearly(tmp_path):
    """Older flowvae saved a planar stack as T one-step modules with 3T parameter tensors: its weights
    load into today's stacked module (same numbers); its optimizer state cannot, and says so."""
    config = tiny(tmp_path, epochs=1, flow="planar", flow_steps=3, eval_samples=2)
    training.train(config)
    ckpt_path = Path(config.out) / "checkpoint.pt"
    saved = torch.load(ckpt_path, weights_only=True)
    model = build_model(config.model, (1, 8, 8), "grayscale")
    training.load_weights(model, saved["model"], ckpt_path)
    old = {}
    for key, value in saved["model"].items():
        if key.startswith("flow.params."):
            name = key[len("flow.") :]
            parts = value.unbind(0) if ".values." in name else value.chunk(3)
            old |= {f"flow.flows.{t}.{name}": part.clone() for t, part in enumerate(parts)}
        else:
            old[key] = value
    rebuilt = build_model(config.model, (1, 8, 8), "grayscale")
    training.load_weights(rebuilt, old, ckpt_path)
    for (name, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), name
    group = saved["optimizer"]["param_groups"][0]
    group["params"] = group["params"] + [max(group["params"]) + 1 + i for i in range(6)]  # 3T tensors, not 3
    torch.save(saved | {"model": old}, ckpt_path)
    with pytest.raises(training.CheckpointError, match="optimizer state does not match this model's parameters"):
        training.train(config, resume=True)


def test_nan_data_is_refused(tmp_path, monkeypatch):
    images = torch.rand(10, 1, 8, 8)
    images[3, 0, 2, 2] = float("nan")
    splits = DatasetSplits("nanset", images, torch.rand(5, 1, 8, 8), torch.rand(5, 1, 8, 8), "grayscale")
    monkeypatch.setattr(setup, "load_dataset", lambda *a, **k: splits)
    with pytest.raises(DataError, match="train split contains NaN"):
        training.train(tiny(tmp_path))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("lr", -1.0, "lr=-1.0"),
        ("flow", "nice", "flow must be one of"),
        ("dataset", "imagenet", "dataset must be one of"),
        ("epochs", 0, "epochs must be > 0"),
        ("lr_decay", 1.5, "lr_decay must be in"),
    ],
)
def test_bad_config_values_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({field: value}).validate()


def test_cli_train_evaluate_sample_and_yaml_config(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset": "digits",
                "latent_dim": 4,
                "hidden": 32,
                "flow": "planar",
                "flow_steps": 3,
                "epochs": 5,
                "eval_samples": 10,
                "progress": False,
            }
        )
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--epochs", "2", "--out", str(out), "--threads", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["nll_samples"] == 10 and printed["test_nll"] > 0 and printed["test_nll_mc_se"] >= 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["model"]["flow"] == "planar"  # flag overrides the file
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(out),
                "--samples",
                "7",
                "--split",
                "valid",
                "--limit",
                "30",
                "--output",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["nll_samples"] == 7 and evaluation["split"] == "valid" and evaluation["points"] == 30
    capsys.readouterr()
    assert main(["sample", "--run", str(out), "--n", "9", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--lr", "abc"], "lr must be float"),
        (["train", "--flow", "nice"], "flow must be one of"),
        (["train", "--config", "/nonexistent.yaml"], "does not exist"),
        (["evaluate", "--run", "/nonexistent"], "not a flowvae run directory"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_refuses_a_run_directory_with_a_corrupt_config(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("flow: [iaf\n")
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not valid YAML" in err and len(err.splitlines()) == 1


def test_cli_rejects_unknown_yaml_keys(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("latent_dim: 4\nlatnet_dim: 5\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown config key(s) latnet_dim" in capsys.readouterr().err


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "flowvae", "--help"],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0 and "train" in result.stdout and "toy" in result.stdout


def test_bf16_autocast_trains_and_keeps_densities_in_float32(tmp_path):
    results = training.train(tiny(tmp_path, epochs=2, precision="bf16"))
    assert all(torch.isfinite(torch.tensor(results["test"][k])) for k in ("neg_elbo", "nll"))
    from flowvae.models import build_vae

    model = build_vae("mlp", (1, 8, 8), 4, hidden=16, flow="iaf", flow_steps=2, flow_hidden=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ld = model(torch.bernoulli(torch.full((3, 1, 8, 8), 0.5)))
    assert ld.log_likelihood.dtype == ld.log_posterior.dtype == ld.log_prior.dtype == torch.float32


def test_lr_decays_on_plateau_and_resume_keeps_it(tmp_path, monkeypatch):
    real_evaluate, calls = epoch.evaluate, []

    def worsening_evaluate(*args, **kwargs):  # every validation is worse than the last: a plateau from epoch 2
        result = real_evaluate(*args, **kwargs)
        calls.append(1)
        return result | {"neg_elbo": result["neg_elbo"] + 100.0 * len(calls)}

    monkeypatch.setattr(epoch, "evaluate", worsening_evaluate)
    monkeypatch.setattr(safeguards, "DIVERGED_EPOCHS", 10**9)  # the fake plateau is not a divergence
    config = tiny(tmp_path, epochs=3, lr=1e-3, lr_decay=0.5, lr_patience=2, patience=0)
    training.train(config)
    config.epochs = 6
    training.train(config, resume=True)
    rows = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])


def test_trainer_tensorboard_events_continue_across_a_resume_without_duplicates(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny(tmp_path, epochs=1, eval_samples=2, tensorboard=True)
    training.train(config)
    config.epochs = 2
    training.train(config, resume=True)
    steps = torch.load(Path(config.out) / "checkpoint.pt", weights_only=True)["state"]["step"]
    events = EventAccumulator(str(Path(config.out) / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, steps + 1))
    assert {
        "train/kl",
        "train/reconstruction",
        "train/lr",
        "valid/neg_elbo",
        "valid/kl",
        "epoch/skipped_updates",
    } <= set(events.Tags()["scalars"])
    assert len(events.Scalars("valid/neg_elbo")) == 2 and "samples" in events.Tags()["images"]
    assert (Path(config.out) / "curves.png").stat().st_size > 0


def test_resume_of_a_checkpoint_saved_on_another_device_type_reseeds_and_says_so(tmp_path, caplog):
    config = tiny(tmp_path, epochs=1, eval_samples=2, device="cpu")  # saved on the CPU, said to be from CUDA
    training.train(config)
    path = Path(config.out) / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["rng"]["noise_device"] = "cuda"
    ckpt["rng"]["noise"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state has another size
    torch.save(ckpt, path)
    config.epochs = 2
    with caplog.at_level("WARNING", logger="flowvae.training"):
        results = training.train(config, resume=True)
    assert "reseeded from (seed, step)" in caplog.text and results["epochs_trained"] == 2


def test_deterministic_flag_trains_and_repeats_exactly(tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        cmd = [
            sys.executable,
            "-m",
            "flowvae",
            "train",
            *TINY_FLAGS,
            "--epochs",
            "1",
            "--deterministic",
            "--out",
            str(out),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-1000:]
    a, b = (_model_tensors(out / "checkpoint.pt") for out in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((outs[0] / "config.yaml").read_text())["deterministic"] is True
