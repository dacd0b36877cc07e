"""Bad input, third pass (issue 27): what a run directory, a config file and the figure commands
must survive.  One test (or one parametrised group) per item of the issue, numbered as there.

Most cases call ``flowvae.cli.main`` in this process (torch is imported once); the ones that need a
process of their own (a FIFO or /dev/urandom as config, a thread's traceback, SIGTERM) run
``python -m flowvae``.  Every case checks the exit status, the one line on stderr, and the files
that must be left exactly as they were (decoys outside the run, config.yaml byte for byte) or must
not exist afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_runs
import torch
import yaml

from flowvae import cli, io
from flowvae.cli.options import config_from_args, given_options, no_effect
from flowvae.config import ConfigError, TrainConfig
from flowvae.data import DataError
from flowvae.data.cache import download
from flowvae.models import build_model
from flowvae.training import prepare_data, resume_differences

QUICK = tiny_runs.flags(tiny_runs.SMALLEST)
SRC = str(Path(__file__).resolve().parents[1] / "src")
DECOY = "user notes, keep\n"


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return os.environ | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": SRC + (os.pathsep + path if path else ""),
        "PYTHONWARNINGS": "ignore",
    }


def flowvae(argv: list[str], prefix: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "flowvae", *argv], env=_env(), capture_output=True, text=True, timeout=timeout
    )


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """``flowvae ARGV`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def digest(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) by name: its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny run (digits, 1 epoch, no EMA), copied by every test that changes a run."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["train", *QUICK, "--out", str(run)]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# -------------------------------------------------------------------------------- 1. symbolic links


@pytest.mark.parametrize("resume", [False, True])
def test_1_a_symlinked_lock_is_refused_and_its_target_untouched(run, tmp_path, capsys, resume):
    decoy = tmp_path / "notes.txt"
    decoy.write_text(DECOY)
    if not resume:
        run = tmp_path / "fresh"
        run.mkdir()
    (run / ".flowvae.lock").unlink(missing_ok=True)
    (run / ".flowvae.lock").symlink_to(decoy)
    argv = ["train", "--out", str(run), "--resume", "--epochs", "2"] if resume else ["train", *QUICK, "--out", str(run)]
    rc, err = run_cli(capsys, *argv)
    assert rc == 2 and "symbolic link" in one_line(err) and ".flowvae.lock" in err
    assert decoy.read_text() == DECOY
    assert (run / ".flowvae.lock").is_symlink()  # the user's link is left as it was


def test_1_a_dangling_lock_link_creates_nothing_at_its_target(tmp_path, capsys):
    target = tmp_path / "elsewhere" / "lock"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".flowvae.lock").symlink_to(target)
    rc, err = run_cli(capsys, "train", *QUICK, "--out", str(tmp_path / "run"))
    assert rc == 2 and "symbolic link" in one_line(err)
    assert not target.exists()


def test_1_a_lock_that_is_not_a_regular_file_is_refused(run, capsys):
    (run / ".flowvae.lock").unlink()
    os.mkfifo(run / ".flowvae.lock")
    rc, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "2")
    assert rc == 2 and "not a regular file" in one_line(err)


def test_1_a_symlinked_tensorboard_directory_is_refused(run, tmp_path, capsys):
    decoy = tmp_path / "elsewhere"
    decoy.mkdir()
    (decoy / "keep.txt").write_text(DECOY)
    (run / "tensorboard").symlink_to(decoy, target_is_directory=True)
    before = digest(run)
    rc, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "2", "--tensorboard")
    assert rc == 2 and "symbolic link" in one_line(err) and "tensorboard" in err
    assert digest(decoy) == {"keep.txt": DECOY.encode()}
    assert digest(run) == before


# ------------------------------------------------------------------- 2. a failed resume changes nothing


@pytest.mark.parametrize("problem", ["tensorboard is a file", "no tensorboard package"])
def test_2_a_failed_resume_leaves_config_yaml_byte_for_byte(run, capsys, monkeypatch, problem):
    if problem == "tensorboard is a file":
        (run / "tensorboard").write_text(DECOY)
    else:
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    before = digest(run)
    rc, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "2", "--tensorboard")
    line = one_line(err)
    assert rc == 2 and ("not a directory" in line if problem == "tensorboard is a file" else "pip install" in line)
    assert digest(run) == before  # config.yaml (epochs: 1, tensorboard: false), checkpoint, lock: all as they were


# --------------------------------------------------------------------------------- 3. a full disk


def test_3_disk_full_keeps_best_behind_the_checkpoint_and_names_the_file(run, capsys, monkeypatch):
    """An injected ENOSPC on the first write of best.pt during a resume (where a small tmpfs cannot be
    mounted this is the portable way): the message names best.pt, checkpoint.pt is not behind best.pt,
    and the next resume rewrites best.pt from the checkpoint."""
    real_fsync, failed = os.fsync, []

    def fsync(fd: int) -> None:
        if ".best.pt." in os.readlink(f"/proc/self/fd/{fd}") and not failed:
            failed.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)
    rc, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "3")
    assert failed, "epoch 2 or 3 improved on epoch 1 (an untrained 1-epoch model always does)"
    line = one_line(err)
    assert rc == 2 and str(run / "best.pt") in line and "No space left on device" in line
    epoch = lambda name: torch.load(run / name, weights_only=True)  # noqa: E731
    ckpt, best = epoch("checkpoint.pt"), epoch("best.pt")
    assert best["epoch"] < ckpt["state"]["epoch"] == ckpt["state"]["best_epoch"]
    assert not list(run.glob(f".*{io.TEMP_SUFFIX}"))

    monkeypatch.setattr(io.os, "fsync", real_fsync)
    rc, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "3")
    assert rc == 0, err
    ckpt, best = epoch("checkpoint.pt"), epoch("best.pt")
    assert best["epoch"] == ckpt["state"]["best_epoch"]
    results = json.loads((run / "results.json").read_text())
    assert results["epochs_trained"] == 3 and results["best_epoch"] == best["epoch"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 6 MB tmpfs (where this machine lets the tests mount one: root with CAP_SYS_ADMIN)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("no tmpfs can be mounted here; test_3_disk_full_keeps_best_behind... injects the error instead")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_3_a_real_full_disk_leaves_a_consistent_resumable_run(trained, small_tmpfs, capsys):
    run = small_tmpfs / "run"
    shutil.copytree(trained, run)
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill the file system, then free less than two checkpoints
    with pytest.raises(OSError, match="No space left"):
        while True:
            os.write(fd, b"\0" * 4096)
    os.ftruncate(fd, max(0, os.fstat(fd).st_size - (run / "checkpoint.pt").stat().st_size - 16384))
    os.close(fd)
    rc, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "3")
    line = one_line(err)
    assert rc == 2 and "No space left on device" in line and str(run) in line
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] <= ckpt["state"]["epoch"]
    assert not list(run.glob(f".*{io.TEMP_SUFFIX}"))
    filler.unlink()
    rc, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "3")
    assert rc == 0, err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == ckpt["state"]["best_epoch"]
    assert json.loads((run / "results.json").read_text())["epochs_trained"] == 3


# ------------------------------------------------------------------ 4. no directories outside the run


def test_4_a_failed_download_removes_the_directories_it_created(tmp_path):
    missing = tmp_path / "no" / "such" / "data"
    with pytest.raises(DataError):
        download((tmp_path / "absent.bin").as_uri(), missing / "file.bin", None)
    assert not (tmp_path / "no").exists()


def test_4_train_with_a_missing_data_dir_leaves_no_directory(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    rc, err = run_cli(
        capsys,
        "train",
        *QUICK,
        "--dataset",
        "binarized_mnist",
        "--data-dir",
        str(tmp_path / "typo" / "data"),
        "--out",
        str(tmp_path / "run"),
    )
    assert rc == 2 and "could not download" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad",
    [
        ["--lr", "-1"],
        ["--lr", "nan"],
        ["--hidden", "0"],
        ["--anneal-steps", "-5"],
        ["--flow-steps", "1000000"],
        ["--flow", "iaf", "--hidden", "0"],
    ],
)
def test_4_toy_errors_leave_no_out_directory(tmp_path, capsys, bad):
    out = tmp_path / "toy" / "out"
    rc, err = run_cli(capsys, "toy", "--iterations", "2", "--eval-samples", "10", "--out", str(out), *bad)
    assert rc == 2 and one_line(err).startswith("flowvae toy: error:")
    assert not (tmp_path / "toy").exists()


# ----------------------------------------------------------------- 5. posterior and manifold figures

ARCH_OPTIONS = {
    "mlp": {},
    "conv": {"feature_dim": 8},
    "gated": {"feature_dim": 8},
    "ladder": {"layers": 2},
    "resnet": {"layers": 1, "channels": 4},
}


def _untrained_run(directory: Path, arch: str, latent_dim: int) -> Path:
    """A run directory (config.yaml, best.pt) of an untrained model: what the figure commands read."""
    config = TrainConfig.from_dict(
        {
            "dataset": "digits",
            "hidden": 8,
            "latent_dim": latent_dim,
            "arch": arch,
            **ARCH_OPTIONS[arch],
            "out": str(directory),
        }
    ).validate()
    data = prepare_data(config)
    model = build_model(config.model, data.splits.image_shape, data.splits.kind)
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    torch.save(
        {"format": 2, "model": model.state_dict(), "config": config.to_dict(), "epoch": 1}, directory / "best.pt"
    )
    return directory


@pytest.mark.parametrize("latent_dim", [2, 3])
@pytest.mark.parametrize("arch", list(ARCH_OPTIONS))
def test_5_posterior_and_manifold_draw_or_refuse_in_one_line(tmp_path, capsys, arch, latent_dim):
    run = _untrained_run(tmp_path / "run", arch, latent_dim)
    single = arch in ("mlp", "conv", "gated")
    rc, err = run_cli(capsys, "posterior", "--run", str(run), "--n", "1", "--grid", "16", "--samples", "10")
    if single and latent_dim == 2:
        assert rc == 0 and (run / "posterior.png").read_bytes().startswith(b"\x89PNG"), err
    else:
        line = one_line(err)
        assert rc == 2 and ("latent_dim=3" in line if single else "single-latent models only" in line)
        assert not (run / "posterior.png").exists()
    rc, err = run_cli(capsys, "manifold", "--run", str(run), "--n", "3", "--dims", "2")
    if single:
        assert rc == 0 and (run / "manifold.png").read_bytes().startswith(b"\x89PNG"), err
    else:
        line = one_line(err)
        assert rc == 2 and f"is a {arch} model" in line and "--arch mlp, conv, gated" in line
        assert not (run / "manifold.png").exists()


# --------------------------------------------------------------- 6. an unwritable TensorBoard directory


def test_6_an_unwritable_tensorboard_directory_is_one_line_without_a_thread_traceback(run):
    (run / "tensorboard").mkdir()
    (run / "tensorboard").chmod(0o555)
    # root writes anywhere: drop the capability that lets it, as a user without root rights is
    prefix = ("setpriv", "--bounding-set=-dac_override") if os.geteuid() == 0 else ()
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no directory is unwritable here")
    before = digest(run)
    done = flowvae(["train", "--out", str(run), "--resume", "--epochs", "2", "--tensorboard"], prefix)
    assert done.returncode == 2 and "cannot be written" in one_line(done.stderr), done.stderr
    assert digest(run) == before


# ------------------------------------------------------------------------------ 7. config files


@pytest.mark.parametrize("kind", ["/dev/urandom", "fifo", "/dev/zero", "large"])
def test_7_a_config_must_be_a_regular_file_of_sensible_size(tmp_path, kind):
    path = {"fifo": tmp_path / "config.yaml", "large": tmp_path / "big.yaml"}.get(kind, Path(kind))
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "large":
        path.write_text("# padding\n" * 200_000 + "epochs: 1\n")
    started = time.perf_counter()
    done = flowvae(["train", "--config", str(path), "--out", str(tmp_path / "run")], timeout=60)
    line = one_line(done.stderr)
    assert done.returncode == 2 and str(path) in line
    assert ("not a regular file" if kind != "large" else "MiB") in line
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- 8. evaluate's K


def test_8_evaluate_bounds_the_importance_samples(trained, capsys):
    rc, err = run_cli(capsys, "evaluate", "--run", str(trained), "--samples", "1000000000", "--limit", "1")
    assert rc == 2 and "--samples must be at most 100000" in one_line(err)
    rc, err = run_cli(capsys, "train", *QUICK, "--eval-samples", "1000000000", "--out", str(trained.parent / "x"))
    assert rc == 2 and "eval_samples" in one_line(err) and not (trained.parent / "x").exists()


# ------------------------------------------------------------------------ 9. EMA switched on at resume


def test_9_ema_switched_on_at_resume_starts_from_the_resumed_weights(run, capsys, caplog):
    before = torch.load(run / "checkpoint.pt", weights_only=True)
    assert before["ema"] is None
    rc, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "2", "--ema", "0.999")
    assert rc == 0, err
    assert "trained without --ema" in caplog.text
    after = torch.load(run / "checkpoint.pt", weights_only=True)
    assert after["ema"] is not None and after["config"]["ema"] == 0.999
    # one epoch of updates with decay 0.999 moves the average only a little from epoch 1's weights
    name = next(k for k, v in before["model"].items() if v.is_floating_point() and v.numel() > 1)
    start, live, average = before["model"][name], after["model"][name], after["ema"][f"module.{name}"]
    assert (average - start).norm() < (live - start).norm()


# ----------------------------------------------------------------------------- 10. names and case


def test_10_names_are_normalised_where_the_config_is_read():
    args = cli.build_parser().parse_args(["train", "--arch", "Resnet", "--flow", "GLOW", "--prior", "Standard"])
    config = config_from_args(args)
    assert (config.model.arch, config.model.flow, config.model.prior) == ("resnet", "glow", "standard")
    saved = TrainConfig.from_dict({"model": {"arch": "LADDER"}}).to_dict()
    assert saved["model"]["arch"] == "ladder"
    refused, _ = resume_differences(
        {**saved, "model": {**saved["model"], "arch": "LADDER"}}, TrainConfig.from_dict({"model": {"arch": "ladder"}})
    )
    assert refused == []
    args = cli.build_parser().parse_args(["train", "--arch", "Resnet", "--flow", "planar"])
    with pytest.raises(ConfigError, match="must be one of none, iaf, glow, coupling for arch resnet"):
        config_from_args(args)


# ------------------------------------------------------------------------ 11. our own debris


def _debris(run: Path, best_epoch: int = 1) -> Path:
    """What a kill during the first writes leaves: config.yaml, best.pt, metrics, a stale temporary."""
    for name in ("checkpoint.pt", "results.json", "samples.png", "reconstructions.png"):
        (run / name).unlink()
    best = torch.load(run / "best.pt", weights_only=True)
    torch.save(best | {"epoch": best_epoch}, run / "best.pt")
    (run / f".checkpoint.pt.abcd1234{io.TEMP_SUFFIX}").write_bytes(b"half a checkpoint")
    return run


@pytest.mark.parametrize("resume", [False, True])
def test_11_a_start_killed_in_its_first_writes_is_started_afresh(run, capsys, caplog, resume):
    _debris(run)
    argv = ["train", "--out", str(run), "--resume"] if resume else ["train", *QUICK, "--out", str(run)]
    rc, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert ("starting the run afresh" in caplog.text) == resume
    assert (run / "checkpoint.pt").is_file() and (run / "results.json").is_file()
    assert not list(run.glob(f".*{io.TEMP_SUFFIX}"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_11_a_start_killed_in_its_very_first_write_is_started_afresh(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / f".config.yaml.abcd1234{io.TEMP_SUFFIX}").write_text("dataset: dig")
    rc, err = run_cli(capsys, "train", *QUICK, "--out", str(run))
    assert rc == 0, err
    assert not list(run.glob(f".*{io.TEMP_SUFFIX}")) and (run / "checkpoint.pt").is_file()


@pytest.mark.parametrize("foreign", ["a user's file", "best.pt of a later epoch", "metrics without config.yaml"])
def test_11_anything_else_is_not_taken_for_debris(run, capsys, foreign):
    _debris(run, best_epoch=7 if foreign == "best.pt of a later epoch" else 1)
    if foreign == "a user's file":
        (run / "notes.txt").write_text(DECOY)
    if foreign == "metrics without config.yaml":
        (run / "config.yaml").unlink()
    before = digest(run)
    rc, err = run_cli(capsys, "train", *QUICK, "--out", str(run))
    assert rc == 2 and "holds no flowvae run" in one_line(err)
    assert digest(run) == before


# --------------------------------------------------------------------- 12. options without effect


@pytest.mark.parametrize(
    "flags, option",
    [
        (["--arch", "mlp", "--layers", "3"], "--layers"),
        (["--prior", "standard", "--prior-flow", "coupling"], "--prior-flow"),
        (["--flow", "none", "--flow-steps", "8"], "--flow-steps"),
        (["--arch", "resnet", "--hidden", "100"], "--hidden"),
        (["--pseudo-inputs", "10"], "--pseudo-inputs"),
        (["--flow-hidden", "16"], "--flow-hidden"),
    ],
)
def test_12_options_without_effect_are_named(flags, option):
    args = cli.build_parser().parse_args(["train", *flags])
    config = config_from_args(args)
    assert [m for m in no_effect(config, given_options(args)) if m.startswith(f"{option} has no effect here")]
    assert no_effect(config, set()) == []  # defaults never warn


def test_12_options_with_effect_are_not_named(tmp_path):
    for flags in (
        [
            "--arch",
            "ladder",
            "--layers",
            "3",
            "--prior",
            "flow",
            "--prior-flow",
            "coupling",
            "--flow",
            "iaf",
            "--flow-steps",
            "2",
        ],
        ["--prior", "flow", "--flow-hidden", "16"],
    ):
        args = cli.build_parser().parse_args(["train", *flags])
        assert no_effect(config_from_args(args), given_options(args)) == []
    path = tmp_path / "run.yaml"  # a config file's keys count as given
    path.write_text("model:\n  arch: mlp\n  layers: 3\n")
    args = cli.build_parser().parse_args(["train", "--config", str(path)])
    assert no_effect(config_from_args(args), given_options(args))[0].startswith("--layers has no effect")


def test_12_the_trainer_warns_once_the_run_has_started_and_an_error_stays_one_line(tmp_path, capsys, caplog):
    rc, err = run_cli(capsys, "train", *QUICK, "--layers", "3", "--tf32", "--out", str(tmp_path / "run"))
    assert rc == 0, err
    assert "--layers has no effect here" in caplog.text and "--tf32 has no effect on cpu" in caplog.text
    caplog.clear()
    rc, err = run_cli(
        capsys,
        "train",
        *QUICK,
        "--layers",
        "3",
        "--prior",
        "vamp",
        "--arch",
        "resnet",
        "--out",
        str(tmp_path / "other"),
    )
    assert rc == 2 and "vamp prior needs vector latents" in one_line(err) and "no effect" not in caplog.text


def test_12_free_bits_that_switch_the_kl_off_are_refused(tmp_path, capsys):
    rc, err = run_cli(capsys, "train", *QUICK, "--free-bits", "1e30", "--out", str(tmp_path / "run"))
    assert rc == 2 and "free_bits" in one_line(err) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["[]", "0", '""', "false", "5"])
def test_12_a_model_key_that_is_not_a_mapping_is_refused(tmp_path, capsys, value):
    path = tmp_path / "run.yaml"
    path.write_text(f"epochs: 1\nmodel: {value}\n")
    rc, err = run_cli(capsys, "train", "--config", str(path), "--out", str(tmp_path / "run"))
    assert rc == 2 and "model must be a mapping" in one_line(err)
    path.write_text("epochs: 1\nmodel:\n")  # an empty `model:` is no model options at all
    assert TrainConfig.from_dict(yaml.safe_load(path.read_text())).model == TrainConfig().model


# ---------------------------------------------------------------------------------- 13. SIGTERM


def test_13_sigterm_ends_training_like_ctrl_c_with_a_resumable_run(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowvae", "train", *QUICK, "--epochs", "100000", "--patience", "0", "--out", str(run)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert one_line(err) == f"flowvae train: terminated (SIGTERM); continue with: flowvae train --out {run} --resume"
    assert not list(run.glob(f".*{io.TEMP_SUFFIX}"))
    done = torch.load(run / "checkpoint.pt", weights_only=True)["state"]["epoch"]
    resumed = flowvae(["train", "--out", str(run), "--resume", "--epochs", str(done + 1)])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "results.json").read_text())["epochs_trained"] == done + 1
