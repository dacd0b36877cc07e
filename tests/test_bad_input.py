"""Bad input through the real command line (issue 12): a new user's mistakes.

Every case runs the ``flowvae`` command in a process of its own (``OMP_NUM_THREADS=1``) and must end
with the documented exit status (2 for a mistake), one line on stderr naming the problem, no
traceback, nothing on stdout, and no file changed or left behind: each case works in its own
directory, which is snapshotted (names, sizes, modes, times, SHA-256) before and after.  The two
tiny runs the cases read are built once and checked unchanged at the end.

How a case runs: ``python -m flowvae`` costs 2-4 s of CPU to import torch, which for ~110 cases on
two cores is minutes.  So each of the 3 pool workers starts one "fork server" that imports flowvae
(torch included) once; per case it forks a child that changes to the case's directory, points
fd 1/2 at files and runs ``flowvae/__main__.py`` with ``runpy`` exactly as ``python -m flowvae`` does
(an uncaught exception prints its traceback and exits 1, as the interpreter would).  The cases
marked ``exec_=True``, the multi-command scenarios and the tiny runs use real ``python -m flowvae``
processes; ``FLOWVAE_BAD_INPUT_EXEC=1`` runs every case that way.

The cases run concurrently in a module-scoped fixture; the tests only look at the results.  A few
scenarios are more than one command (two trainings into one directory, Ctrl-C, a resume that
changes the learning rate, a divergence, a umask): they run in the same pool as functions and have
their own tests below.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_runs
import torch
import yaml

TINY = tiny_runs.flags(tiny_runs.DIGITS_IAF)
QUICK = tiny_runs.flags(tiny_runs.SMALLEST)
WORKERS = 3
CASE_TIMEOUT_S = 240
EXEC_ALL = os.environ.get("FLOWVAE_BAD_INPUT_EXEC") == "1"
DATA_DIR = Path(tempfile.gettempdir()) / "flowvae-bad-input-no-data"  # never ~/.cache/flowvae (set by the fixture)


# ------------------------------------------------------------------------------------------ running


@dataclasses.dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    before: dict[str, tuple] = dataclasses.field(default_factory=dict)
    after: dict[str, tuple] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.environ.get("PYTHONPATH", "")
    return os.environ | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": src + (os.pathsep + path if path else ""),
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        "FLOWVAE_DATA": str(DATA_DIR),
    }


def flowvae(argv: list[str], cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flowvae", *argv],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT_S,
        **kwargs,
    )


FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import flowvae.cli, flowvae.cli.report_commands, flowvae.training, flowvae.toy.cli  # torch and the CLI, once

for line in iter(sys.stdin.readline, ""):
    request = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: python -m flowvae ARGV, in CWD, with stdout and stderr to files
        code = 1
        try:
            os.chdir(request["cwd"])
            if request.get("umask") is not None:
                os.umask(request["umask"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            sys.argv = ["flowvae", *request["argv"]]
            try:
                runpy.run_module("flowvae", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exit_:
                if exit_.code is None or isinstance(exit_.code, int):
                    code = exit_.code or 0
                else:
                    print(exit_.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkServer:
    """A Python process that has imported flowvae and forks one child per command."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER], env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, argv: list[str], cwd: Path, umask: int | None = None) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as io_dir:
            out, err = Path(io_dir) / "stdout", Path(io_dir) / "stderr"
            self.proc.stdin.write(
                json.dumps({"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err), "umask": umask})
                + "\n"
            )
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            assert reply, "the fork server died"
            return subprocess.CompletedProcess(argv, json.loads(reply)["rc"], out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


SERVERS: queue.Queue = queue.Queue()  # filled by the fixture


def command(
    argv: list[str], cwd: Path, *, exec_: bool = False, umask: int | None = None
) -> subprocess.CompletedProcess:
    """``flowvae ARGV`` in ``cwd``: forked from a fork server, or with ``exec_`` a fresh process."""
    if exec_ or EXEC_ALL:
        return flowvae(argv, cwd, umask=umask) if umask is not None else flowvae(argv, cwd)
    server = SERVERS.get()
    try:
        return server.run(argv, cwd, umask)
    finally:
        SERVERS.put(server)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: (kind, size, mode, mtime, sha256) — any change shows."""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
        state[str(path.relative_to(root))] = (
            "dir" if path.is_dir() else "file",
            info.st_size if path.is_file() else 0,
            info.st_mode,
            info.st_mtime_ns if path.is_file() else 0,
            digest,
        )
    return state


# --------------------------------------------------------------------------------------- the cases


@dataclasses.dataclass
class Case:
    """``argv`` may name ``{run}`` (a 2-epoch latent-4 IAF run on digits, read only), ``{run2d}``
    (latent 2, read only) and ``{copy}`` (a private copy of {run}, made by ``setup``)."""

    id: str
    argv: list[str]
    message: str  # regex the one stderr line must match
    rc: int = 2
    setup: Callable[[Path], None] | None = None
    needs_runs: bool = False
    exec_: bool = False  # run as a real ``python -m flowvae`` process, not forked


def _copy_run(name: str = "copy", change: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    def setup(case: Path) -> None:
        shutil.copytree(case.parent.parent / "runs" / "tiny", case / name)
        if change is not None:
            change(case / name)

    return setup


def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(case: Path) -> None:
        path = case / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)

    return setup


def _both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(case: Path) -> None:
        for s in setups:
            s(case)

    return setup


def _edit_checkpoint(name: str, edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        ckpt = torch.load(run / name, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, run / name)

    return change


def _truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: int(len(data) * keep)])

    return change


def _other_model_best(run: Path) -> None:
    shutil.copy(run.parent.parent.parent / "runs" / "tiny2d" / "best.pt", run / "best.pt")


def _nan_weights(ckpt: dict) -> None:
    ckpt["model"] = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ckpt["model"].items()
    }


def _wrong_shape(ckpt: dict) -> None:
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.zeros(3, 3)


def _garbage_npz() -> bytes:
    return np.random.default_rng(0).bytes(5000)


YAML_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
)


def _cases() -> tuple[list[Case], list[Case]]:
    """(the issue's items 5-13, our own)."""
    r = dict(needs_runs=True)
    listed = [
        # 5. divergence guards: non-finite numbers
        Case(
            "lr-nan", ["train", "--lr", "nan", "--out", "x"], r"bad config value lr=nan: lr must be finite", exec_=True
        ),
        Case("lr-inf", ["train", "--lr", "inf", "--out", "x"], r"lr=inf: lr must be finite"),
        Case(
            "free-bits-nan", ["train", "--free-bits", "nan", "--out", "x"], r"free_bits=nan: free_bits must be finite"
        ),
        Case("free-bits-inf", ["train", "--free-bits=-inf", "--out", "x"], r"free_bits=-inf: free_bits must be finite"),
        # 7. a resume refuses another run's options, naming the field, before loading any data
        Case(
            "resume-seed",
            ["train", "--out", "copy", "--resume", "--seed", "5"],
            r"different run: seed=0 there, 5 here",
            setup=_copy_run(),
            **r,
        ),
        Case(
            "resume-dataset",
            ["train", "--out", "copy", "--resume", "--dataset", "mnist"],
            r"different run: dataset='digits' there, 'mnist' here",
            setup=_copy_run(),
            **r,
        ),
        Case(
            "resume-batch-size",
            ["train", "--out", "copy", "--resume", "--batch-size", "50"],
            r"batch_size=100 there, 50 here",
            setup=_copy_run(),
            **r,
        ),
        Case(
            "resume-optimizer",
            ["train", "--out", "copy", "--resume", "--optimizer", "adamax"],
            r"optimizer='adam' there, 'adamax' here",
            setup=_copy_run(),
            **r,
        ),
        Case(
            "resume-precision",
            ["train", "--out", "copy", "--resume", "--precision", "bf16"],
            r"precision='fp32' there, 'bf16' here",
            setup=_copy_run(),
            **r,
        ),
        Case(
            "resume-latent-dim",
            ["train", "--out", "copy", "--resume", "--latent-dim", "8"],
            r"different model: latent_dim=4 there, 8 here",
            setup=_copy_run(),
            **r,
        ),
        Case(
            "resume-flow",
            ["train", "--out", "copy", "--resume", "--flow", "planar"],
            r"different model: flow='iaf' there, 'planar' here",
            setup=_copy_run(),
            **r,
        ),
        Case(
            "resume-epochs-below-done",
            ["train", "--out", "copy", "--resume", "--epochs", "1", "--lr", "5e-4"],
            r"--epochs 1 is below the 2 epochs .*copy has already trained",
            setup=_copy_run(),
            **r,
        ),
        # 8. the run directory
        Case("out-empty", ["train", "--out", ""], r"bad config value out='': out must name a directory"),
        Case("out-blank", ["train", "--out", "  "], r"out must name a directory"),
        Case(
            "out-non-run-dir",
            ["train", *QUICK, "--out", "mine"],
            r"--out mine is a non-empty directory that holds no flowvae run",
            setup=_write("mine/notes.txt", "x"),
        ),
        # 9. a failure before the first checkpoint leaves nothing (here: corrupt data, nested new --out)
        Case(
            "data-error-leaves-nothing",
            ["train", *QUICK, "--dataset", "binarized_mnist", "--data-dir", "data", "--out", "new/deeper/run"],
            r"binarized_mnist_train\.amat: corrupt file \(sha256 is [0-9a-f]{64}, expected ad693b29",
            setup=_write("data/binarized_mnist_train.amat", "0 1 0\n"),
        ),
        # 10. file-system errors
        Case(
            "out-is-file",
            ["train", *QUICK, "--out", "afile"],
            r"--out afile is a file, not a directory",
            setup=_write("afile", "x"),
            exec_=True,
        ),
        Case(
            "out-under-file",
            ["train", *QUICK, "--out", "afile/run"],
            r"--out afile/run: .*afile is a file",
            setup=_write("afile", "x"),
        ),
        Case(
            "out-unwritable",
            ["train", *QUICK, "--out", "/proc/flowvae-run"],
            r"--out /proc/flowvae-run cannot be written",
        ),
        Case(
            "out-under-proc-file",
            ["train", *QUICK, "--out", "/proc/self/status/run"],
            r"--out /proc/self/status/run: /proc/self/status is a file",
        ),
        Case(
            "config-is-dir",
            ["train", "--config", "cfg"],
            r"config file cfg is a directory",
            setup=lambda case: (case / "cfg").mkdir(),
        ),
        Case(
            "config-binary",
            ["train", "--config", "bin.yaml"],
            r"config file bin.yaml is not a text file",
            setup=_write("bin.yaml", b"\xff\xfe\x00\x81" * 40),
        ),
        Case(
            "sample-out-dir",
            ["sample", "--run", "{run}", "--out", "adir"],
            r"--out adir is a directory",
            setup=lambda case: (case / "adir").mkdir(),
            **r,
        ),
        Case(
            "evaluate-output-unwritable",
            ["evaluate", "--run", "{run}", "--output", "/proc/flowvae.json"],
            r"--output /proc/flowvae.json: cannot write in /proc",
            exec_=True,
            **r,
        ),
        Case(
            "evaluate-output-under-file",
            ["evaluate", "--run", "{run}", "--output", "afile/e.json"],
            r"--output afile/e.json: .*afile is not a directory",
            setup=_write("afile", "x"),
            **r,
        ),
        # A FIFO of the case's own, never /dev/null: as root, the unguarded write replaced /dev/null itself.
        Case(
            "evaluate-output-fifo",
            ["evaluate", "--run", "{run}", "--samples", "2", "--output", "fifo"],
            r"--output fifo exists and is not a regular file",
            setup=lambda case: os.mkfifo(case / "fifo"),
            **r,
        ),
        # 11. counts, devices, flow lengths, seeds, checkpoints
        Case("sample-n-0", ["sample", "--run", "{run}", "--n", "0"], r"--n must be between 1 and 10000, got 0", **r),
        Case("sample-n-negative", ["sample", "--run", "{run}", "--n", "-5"], r"--n must be between 1 and 10000", **r),
        Case(
            "evaluate-limit-negative",
            ["evaluate", "--run", "{run}", "--limit", "-5", "--samples", "2"],
            r"--limit must be >= 0",
            **r,
        ),
        Case(
            "evaluate-device-cuda-abc",
            ["evaluate", "--run", "{run}", "--device", "cuda:abc"],
            r"device must be auto, cpu, cuda or cuda:N, got 'cuda:abc'",
            **r,
        ),
        Case("evaluate-device-cudaxyz", ["evaluate", "--run", "{run}", "--device", "cudaXYZ"], r"got 'cudaXYZ'", **r),
        Case("train-device-cuda-abc", ["train", "--device", "cuda:abc"], r"device='cuda:abc': device must be"),
        Case("train-device-cudaxyz", ["train", "--device", "cudaXYZ"], r"device='cudaXYZ': device must be"),
        Case(
            "flow-steps-0",
            ["train", "--flow", "iaf", "--flow-steps", "0"],
            r"flow_steps=0: flow_steps must be between 1 and 256 for a flow",
        ),
        Case(
            "flow-steps-unbounded",
            ["train", "--flow", "iaf", "--flow-steps", "100000000", "--out", "afile"],
            r"flow_steps=100000000: flow_steps must be between 1 and 256",
            setup=_write("afile", "x"),
        ),
        Case("seed-negative", ["train", "--seed", "-1"], r"seed=-1: seed must be between 0 and 4294967295"),
        Case("seed-oversized", ["train", "--seed", "99999999999999999999999"], r"seed=9+: seed must be between"),
        Case(
            "checkpoint-without-config",
            ["evaluate", "--run", "copy"],
            r"best\.pt has no config",
            setup=_copy_run(change=_edit_checkpoint("best.pt", lambda c: c.pop("config"))),
            **r,
        ),
        Case(
            "checkpoint-mismatched-weights",
            ["evaluate", "--run", "copy"],
            r"best\.pt does not fit this model: size mismatch for ",
            setup=_copy_run(change=_edit_checkpoint("best.pt", _wrong_shape)),
            exec_=True,
            **r,
        ),
        # 12. YAML
        Case(
            "yaml-latent-dim-true",
            ["train", "--config", "c.yaml"],
            r"c\.yaml: latent_dim must be int, got True",
            setup=_write("c.yaml", "latent_dim: true\n"),
        ),
        Case(
            "yaml-lr-true",
            ["train", "--config", "c.yaml"],
            r"c\.yaml: lr must be float, got True",
            setup=_write("c.yaml", "lr: true\n"),
        ),
        Case(
            "yaml-out-list",
            ["train", "--config", "c.yaml"],
            r"out must be str, got \['a', 'b'\]",
            setup=_write("c.yaml", "out: [a, b]\n"),
        ),
        Case(
            "yaml-alias-bomb",
            ["train", "--config", "c.yaml"],
            r"YAML aliases \(\*a\) are not allowed",
            setup=_write("c.yaml", YAML_BOMB),
        ),
        Case(
            "yaml-nested-alias",
            ["train", "--config", "c.yaml"],
            r"YAML aliases \(\*m\) are not allowed",
            setup=_write("c.yaml", "base: &m\n  latent_dim: 4\nmodel:\n  <<: *m\n  flow: iaf\n"),
        ),
        # 13. likelihoods, checksums
        Case(
            "gaussian-on-binary",
            ["train", *QUICK, "--likelihood", "gaussian", "--out", "run"],
            r"likelihood 'gaussian' cannot model '(binary|grayscale)' data.*use 'bernoulli'",
        ),
    ]
    own = [
        # typos and wrong types on the command line
        Case(
            "flag-typo",
            ["train", "--flwo", "iaf"],
            r"unrecognized arguments: --flwo iaf \(did you mean --flow\?\)",
            exec_=True,
        ),
        Case(
            "two-flag-typos",
            ["train", "--lr-decy", "0.5", "--epoch-s", "3"],
            r"did you mean --lr-decay for --lr-decy, --epochs for --epoch-s\?",
        ),
        Case("subcommand-typo", ["trian"], r"flowvae: error: argument command: invalid choice: 'trian'"),
        Case("flag-without-value", ["train", "--lr"], r"argument --lr: expected one argument"),
        Case("lr-not-a-number", ["train", "--lr", "abc"], r"command line: lr must be float, got 'abc'"),
        Case("epochs-fractional", ["train", "--epochs", "2.5"], r"epochs must be int, got '2\.5'"),
        Case("epochs-zero", ["train", "--epochs", "0"], r"epochs=0: epochs must be > 0"),
        Case("batch-size-negative", ["train", "--batch-size", "-3"], r"batch_size=-3: batch_size must be > 0"),
        Case("boolean-flag-with-value", ["train", "--no-progress=yes"], r"ignored explicit argument 'yes'"),
        Case("sample-n-not-int", ["sample", "--run", "x", "--n", "abc"], r"argument --n: invalid int value: 'abc'"),
        Case("evaluate-without-run", ["evaluate"], r"the following arguments are required: --run"),
        # option values
        Case(
            "optimizer-sgd", ["train", "--optimizer", "sgd"], r"optimizer='sgd': optimizer must be one of adam, adamax"
        ),
        Case("ema-one", ["train", "--ema", "1"], r"ema=1\.0: ema must be in \[0, 1\)"),
        Case("ema-negative", ["train", "--ema", "-0.1"], r"ema=-0\.1: ema must be in"),
        Case("grad-skip-below-one", ["train", "--grad-skip", "0.5"], r"grad_skip=0\.5: grad_skip must be 0 .* > 1"),
        Case("grad-skip-negative", ["train", "--grad-skip", "-1"], r"grad_skip=-1\.0: grad_skip must be"),
        Case("grad-clip-nan", ["train", "--grad-clip", "nan"], r"grad_clip=nan: grad_clip must be finite"),
        Case("max-minutes-zero", ["train", "--max-minutes", "0"], r"max_minutes=0\.0: max_minutes must be > 0"),
        Case("lr-decay-zero", ["train", "--lr-decay", "0"], r"lr_decay=0\.0: lr_decay must be in \(0, 1\]"),
        Case("warmup-negative", ["train", "--warmup-epochs", "-1"], r"warmup_epochs=-1\.0: warmup_epochs must be >= 0"),
        Case("eval-samples-zero", ["train", "--eval-samples", "0"], r"eval_samples=0: eval_samples must be > 0"),
        Case(
            "precision-fp8", ["train", "--precision", "fp8"], r"precision='fp8': precision must be fp32, bf16 or fp16"
        ),
        Case("device-tpu", ["train", "--device", "tpu"], r"device='tpu': device must be auto, cpu, cuda or cuda:N"),
        # --out afile: were the bound lost, the run stops there before torch starts 100000 threads
        Case(
            "threads-absurd",
            ["train", "--threads", "100000", "--out", "afile"],
            r"threads=100000: threads must be at most 1024",
            setup=_write("afile", "x"),
        ),
        # models that cannot be built
        Case("arch-unknown", ["train", "--arch", "transformer"], r"arch='transformer': arch must be one of mlp"),
        Case(
            "resnet-planar",
            ["train", "--arch", "resnet", "--flow", "planar"],
            r"flow='planar': flow must be one of none, iaf, glow, coupling for arch resnet",
        ),
        Case(
            "resnet-vamp-prior",
            ["train", *QUICK, "--arch", "resnet", "--prior", "vamp", "--out", "run"],
            r"vamp prior needs vector latents",
        ),
        Case("ladder-zero-layers", ["train", "--arch", "ladder", "--layers", "0"], r"layers=0: layers must be > 0"),
        Case(
            "ladder-negative-layers", ["train", "--arch", "ladder", "--layers", "-2"], r"layers=-2: layers must be > 0"
        ),
        Case(
            "sylvester-rank-above-latent",
            ["train", "--flow", "sylvester-orthogonal", "--latent-dim", "4", "--rank", "9"],
            r"rank=9: rank must be between 1 and latent_dim",
        ),
        Case("prior-unknown", ["train", "--prior", "gaussian"], r"prior='gaussian': prior must be one of standard"),
        Case("likelihood-unknown", ["train", "--likelihood", "poisson"], r"likelihood='poisson': likelihood must be"),
        Case(
            "categorical-on-binary",
            ["train", *QUICK, "--likelihood", "categorical256", "--out", "run"],
            r"likelihood 'categorical256' cannot model 'binary' data",
        ),
        Case("dataset-unknown", ["train", "--dataset", "imagenet"], r"dataset='imagenet': dataset must be one of"),
        Case(
            "model-too-big",
            ["train", *QUICK, "--device", "cpu", "--hidden", "1000000000000", "--out", "run"],
            r"out of memory \(tried to allocate [0-9.]+ GiB\): make the model smaller",
            exec_=True,
        ),
        # data files
        Case(
            "npz-corrupt",
            ["train", *QUICK, "--dataset", "binarized_mnist", "--data-dir", "data", "--out", "run"],
            r"binarized_mnist\.npz: corrupt file",
            setup=_write("data/binarized_mnist.npz", _garbage_npz()),
        ),
        Case(
            "freyfaces-truncated",
            ["train", *QUICK, "--dataset", "freyfaces", "--data-dir", "data", "--out", "run"],
            r"freyfaces\.npz: corrupt file",
            setup=_write("data/freyfaces.npz", b"PK\x03\x04" + b"\0" * 100),
        ),
        Case(
            "data-dir-is-file",
            ["train", *QUICK, "--dataset", "binarized_mnist", "--data-dir", "afile", "--out", "run"],
            r"cannot write to data directory afile",
            setup=_write("afile", "x"),
        ),
        # config files
        Case("config-missing", ["train", "--config", "nope.yaml"], r"config file nope\.yaml does not exist"),
        Case(
            "config-list",
            ["train", "--config", "c.yaml"],
            r"c\.yaml must hold a mapping of key: value",
            setup=_write("c.yaml", "- 1\n- 2\n"),
        ),
        Case(
            "config-unknown-key",
            ["train", "--config", "c.yaml"],
            r"unknown config key\(s\) latnet_dim",
            setup=_write("c.yaml", "latnet_dim: 4\n"),
        ),
        Case(
            "config-syntax",
            ["train", "--config", "c.yaml"],
            r"c\.yaml is not valid YAML",
            setup=_write("c.yaml", "flow: [iaf\n"),
        ),
        Case(
            "config-python-tag",
            ["train", "--config", "c.yaml"],
            r"is not valid YAML: could not determine a "
            r"constructor",
            setup=_write("c.yaml", 'epochs: !!python/object/apply:os.system ["true"]\n'),
        ),
        Case(
            "config-model-not-mapping",
            ["train", "--config", "c.yaml"],
            r"model must be a mapping",
            setup=_write("c.yaml", "model: 5\n"),
        ),
        Case(
            "config-duplicate-key",
            ["train", "--config", "c.yaml"],
            r"key 'latent_dim' is given twice \(line 2\)",
            setup=_write("c.yaml", "latent_dim: 4\nlatent_dim: 5\n"),
        ),
        Case(
            "config-null-epochs",
            ["train", "--config", "c.yaml"],
            r"c\.yaml: epochs must be int, got None",
            setup=_write("c.yaml", "epochs: null\n"),
        ),
        Case(
            "config-null-device",
            ["train", "--config", "c.yaml"],
            r"c\.yaml: device must be str, got None",
            setup=_write("c.yaml", "device:\n"),
        ),
        # resuming and reusing run directories
        Case(
            "resume-without-checkpoint",
            ["train", "--out", "new", "--resume"],
            r"new is not a flowvae run directory \(it does not exist\)",
        ),
        Case(
            "resume-truncated-checkpoint",
            ["train", "--out", "copy", "--resume", "--epochs", "3"],
            r"checkpoint\.pt is corrupt, truncated or not a flowvae checkpoint",
            setup=_copy_run(change=_truncate("checkpoint.pt")),
            **r,
        ),
        Case(
            "resume-weights-only-checkpoint",
            ["train", "--out", "copy", "--resume", "--epochs", "3"],
            r"checkpoint\.pt has no optimizer, state, history, rng: it holds weights only",
            setup=_copy_run(change=lambda run: shutil.copy(run / "best.pt", run / "checkpoint.pt")),
            **r,
        ),
        Case(
            "train-into-existing-run",
            ["train", *TINY, "--out", "copy"],
            r"copy already holds a run; pass --resume",
            setup=_copy_run(),
            **r,
        ),
        # evaluate / sample on things that are not runs or hold damaged checkpoints
        Case(
            "evaluate-non-run",
            ["evaluate", "--run", "adir"],
            r"adir is not a flowvae run directory \(no config",
            setup=lambda case: (case / "adir").mkdir(),
        ),
        Case(
            "evaluate-run-is-file",
            ["evaluate", "--run", "afile"],
            r"afile is not a flowvae run directory \(it is "
            r"not a directory\)",
            setup=_write("afile", "x"),
        ),
        Case(
            "evaluate-truncated-best",
            ["evaluate", "--run", "copy"],
            r"best\.pt is corrupt, truncated",
            setup=_copy_run(change=_truncate("best.pt")),
            **r,
        ),
        Case(
            "evaluate-empty-best",
            ["evaluate", "--run", "copy"],
            r"best\.pt is corrupt, truncated",
            setup=_copy_run(change=_truncate("best.pt", 0.0)),
            **r,
        ),
        Case(
            "evaluate-best-of-another-model",
            ["evaluate", "--run", "copy"],
            r"best\.pt was written for a different model: latent_dim=2 there, 4 here",
            setup=_copy_run(change=_other_model_best),
            **r,
        ),
        Case(
            "evaluate-nan-weights",
            ["evaluate", "--run", "copy"],
            r"best\.pt holds non-finite weights",
            setup=_copy_run(change=_edit_checkpoint("best.pt", _nan_weights)),
            **r,
        ),
        Case(
            "evaluate-checkpoint-missing",
            ["evaluate", "--run", "copy", "--checkpoint", "checkpoint"],
            r"checkpoint .*checkpoint\.pt does not exist",
            setup=_copy_run(change=lambda run: (run / "checkpoint.pt").unlink()),
            **r,
        ),
        Case(
            "evaluate-corrupt-config",
            ["evaluate", "--run", "copy"],
            r"config\.yaml is not valid YAML",
            setup=_copy_run(change=lambda run: (run / "config.yaml").write_text("flow: [iaf\n")),
            **r,
        ),
        Case(
            "evaluate-seed-negative",
            ["evaluate", "--run", "{run}", "--seed", "-1"],
            r"--seed must be between 0 and 4294967295, got -1",
            **r,
        ),
        Case(
            "sample-not-png",
            ["sample", "--run", "{run}", "--out", "s.jpg"],
            r"--out s\.jpg: this file is written as PNG; give a name ending in \.png",
            **r,
        ),
        Case(
            "sample-seed-oversized",
            ["sample", "--run", "{run}", "--seed", "99999999999999999999"],
            r"--seed must be between 0 and 4294967295",
            **r,
        ),
        # the report commands
        Case(
            "posterior-non-run",
            ["posterior", "--run", "adir"],
            r"adir is not a flowvae run directory",
            setup=lambda case: (case / "adir").mkdir(),
        ),
        Case(
            "posterior-latent-4",
            ["posterior", "--run", "{run}"],
            r"has latent_dim=4; the posterior can be drawn "
            r"for a 2-D latent only",
            **r,
        ),
        Case(
            "posterior-huge-grid",
            ["posterior", "--run", "{run2d}", "--grid", "100000", "--out", "/proc/p.png"],
            r"--grid in \[8, 1000\]",
            **r,
        ),
        Case(
            "posterior-out-unwritable",
            ["posterior", "--run", "{run2d}", "--out", "/proc/p.png"],
            r"--out /proc/p\.png: cannot write in /proc",
            **r,
        ),
        Case(
            "manifold-non-run",
            ["manifold", "--run", "adir"],
            r"adir is not a flowvae run directory",
            setup=lambda case: (case / "adir").mkdir(),
        ),
        Case("manifold-n-1", ["manifold", "--run", "{run}", "--n", "1"], r"--n must be in \[2, 100\]", **r),
        Case(
            "manifold-out-dir",
            ["manifold", "--run", "{run}", "--out", "adir.png"],
            r"--out adir\.png is a "
            r"directory",
            setup=lambda case: (case / "adir.png").mkdir(),
            **r,
        ),
        Case(
            "curves-non-run",
            ["curves", "adir"],
            r"adir holds no metrics\.csv or metrics\.jsonl",
            setup=lambda case: (case / "adir").mkdir(),
        ),
        Case("curves-on-file", ["curves", "afile"], r"afile is not a directory", setup=_write("afile", "x")),
        Case(
            "curves-out-unwritable",
            ["curves", "{run}", "--out", "/proc/c.png"],
            r"--out /proc/c\.png: cannot "
            r"write in /proc",
            **r,
        ),
        Case("compare-missing-run", ["compare", "{run}", "nope"], r"run directory nope does not exist", **r),
        Case(
            "compare-non-run",
            ["compare", "adir"],
            r"adir is not a flowvae run directory",
            setup=lambda case: (case / "adir").mkdir(),
        ),
        Case(
            "compare-csv-under-file",
            ["compare", "{run}", "--csv", "afile/t.csv"],
            r"--csv afile/t\.csv: "
            r".*afile is not a directory",
            setup=_write("afile", "x"),
            **r,
        ),
        Case(
            "compare-plot-fifo",
            ["compare", "{run}", "--plot", "fifo.png"],
            r"--plot fifo\.png exists and is not "
            r"a regular file",
            setup=lambda case: os.mkfifo(case / "fifo.png"),
            **r,
        ),
        Case(
            "toy-out-is-file",
            ["toy", "--out", "afile", "--iterations", "1"],
            r"--out afile is a file, not a directory",
            setup=_write("afile", "x"),
        ),
        Case("toy-zero-steps", ["toy", "--flow-steps", "0"], r"flow lengths must be >= 1"),
    ]
    if torch.cuda.is_available():
        own.append(
            Case(
                "device-cuda-index",
                ["train", *QUICK, "--device", "cuda:99", "--out", "run"],
                r"'cuda:99' asked for, but this machine has \d+ CUDA device",
            )
        )
    else:
        own.append(
            Case(
                "device-cuda-without-gpu",
                ["train", *QUICK, "--device", "cuda", "--out", "run"],
                r"device 'cuda' asked for, but CUDA is not available",
            )
        )
    return listed, own


LISTED, OWN = _cases()
CASES = LISTED + OWN


def _run_case(case: Case, root: Path) -> Result:
    directory = root / "cases" / case.id
    directory.mkdir(parents=True)
    if case.setup is not None:
        case.setup(directory)
    argv = [a.format(run=root / "runs" / "tiny", run2d=root / "runs" / "tiny2d") for a in case.argv]
    if argv[:1] == ["train"] and "--resume" not in argv:  # a regression trains one tiny epoch, not 100 big ones
        argv = ["train", *QUICK, *argv[1:]]
    before = snapshot(directory)
    started = time.perf_counter()
    done = command(argv, directory, exec_=case.exec_)
    return Result(done.returncode, done.stdout, done.stderr, before, snapshot(directory), time.perf_counter() - started)


# ------------------------------------------------------------------- scenarios of several commands


def _lock_and_interrupt(root: Path) -> Result:
    """Two trainings into one --out: the second is refused naming the first's pid; then Ctrl-C on
    the first after its first checkpoint says how to resume."""
    directory = root / "cases" / "lock"
    directory.mkdir(parents=True)
    # No early stopping and more epochs than any wait: the run must still be training when Ctrl-C comes,
    # however long the refused commands below queue for a worker on a loaded machine.
    endless = ["--epochs", "1000000", "--patience", "0"]
    first = subprocess.Popen(
        [sys.executable, "-m", "flowvae", "train", *TINY, *endless, "--out", "run"],
        cwd=directory,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock, deadline = directory / "run" / ".flowvae.lock", time.time() + CASE_TIMEOUT_S
        while not (lock.exists() and lock.read_text().strip()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        second = command(["train", *TINY, "--epochs", "500", "--out", "run"], directory)
        while not (directory / "run" / "config.yaml").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # --resume reads the run's config.yaml first
        second_resume = command(["train", "--out", "run", "--resume"], directory)
        while not (directory / "run" / "checkpoint.pt").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=CASE_TIMEOUT_S)
    finally:
        first.kill()
    return Result(
        first.returncode,
        out,
        err,
        extra={"pid": first.pid, "second": second, "second_resume": second_resume, "dir": directory},
    )


def _interrupt_before_checkpoint(root: Path) -> Result:
    """Ctrl-C while the first epoch runs: nothing is left, and the message does not promise a resume."""
    directory = root / "cases" / "interrupt-early"
    directory.mkdir(parents=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowvae",
            "train",
            "--dataset",
            "digits",
            "--hidden",
            "2000",
            "--flow",
            "iaf",
            "--flow-hidden",
            "2000",
            "--batch-size",
            "20",
            "--no-progress",
            "--threads",
            "1",
            "--epochs",
            "3",
            "--out",
            "new/run",
        ],
        cwd=directory,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock, deadline = directory / "new" / "run" / ".flowvae.lock", time.time() + CASE_TIMEOUT_S
        while not (lock.exists() and lock.read_text().strip()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)  # the pid is written once the lock is held
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=CASE_TIMEOUT_S)
    finally:
        proc.kill()
    return Result(
        proc.returncode,
        out,
        err,
        after=snapshot(directory),
        extra={"checkpointed": (directory / "new" / "run" / "checkpoint.pt").exists()},
    )


def _resume_with_changes(root: Path) -> Result:
    """--resume --lr X --epochs 3: the lr takes effect, is recorded and written to config.yaml;
    flowvae's own interrupted-write temporaries are removed, a user's look-alike file is kept."""
    directory = root / "cases" / "resume-lr"
    directory.mkdir(parents=True)
    _copy_run()(directory)
    (directory / "copy" / ".metrics.csv.k2j4x9.flowvae-tmp").write_text("half a file")
    (directory / "copy" / ".notes.tmp").write_text("a user's file")
    done = command(
        [
            "train",
            "--out",
            "copy",
            "--resume",
            "--epochs",
            "3",
            "--lr",
            "5e-4",
            "--patience",
            "7",
            "--max-minutes",
            "30",
        ],
        directory,
    )
    return Result(done.returncode, done.stdout, done.stderr, extra={"dir": directory / "copy"})


def _diverge(epochs: int) -> Callable[[Path], Result]:
    def scenario(root: Path) -> Result:
        directory = root / "cases" / f"diverge-{epochs}"
        directory.mkdir(parents=True)
        done = command(["train", *TINY, "--lr", "100", "--epochs", str(epochs), "--out", "run"], directory)
        return Result(done.returncode, done.stdout, done.stderr, extra={"dir": directory / "run"})

    return scenario


def _high_but_workable_lr(root: Path) -> Result:
    """--lr 1e-1: rough, but not a divergence; the run must end normally."""
    directory = root / "cases" / "lr-0.1"
    directory.mkdir(parents=True)
    done = command(["train", *TINY, "--lr", "1e-1", "--epochs", "3", "--out", "run"], directory)
    return Result(done.returncode, done.stdout, done.stderr)


def _umask_and_case_insensitive_dataset(root: Path) -> Result:
    """``--dataset Digits`` trains digits; with umask 077 every file written is private."""
    directory = root / "cases" / "umask"
    directory.mkdir(parents=True)
    done = command(["train", *QUICK, "--dataset", "Digits", "--out", "run"], directory, umask=0o077)
    return Result(done.returncode, done.stdout, done.stderr, extra={"dir": directory / "run"})


SCENARIOS: dict[str, Callable[[Path], Result]] = {
    "lock": _lock_and_interrupt,
    "interrupt-early": _interrupt_before_checkpoint,
    "resume-lr": _resume_with_changes,
    "diverge-2": _diverge(2),
    "diverge-6": _diverge(6),
    "lr-0.1": _high_but_workable_lr,
    "umask": _umask_and_case_insensitive_dataset,
}


# --------------------------------------------------------------------------------- run them all


def _timed(scenario: Callable[[Path], Result], root: Path) -> Result:
    started = time.perf_counter()
    result = scenario(root)
    result.seconds = time.perf_counter() - started
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    global DATA_DIR
    root = tmp_path_factory.mktemp("bad_input")
    (root / "runs").mkdir()
    DATA_DIR = root / "data-cache"  # a download, were one attempted, lands in the test's own directory
    started = time.perf_counter()
    for _ in range(0 if EXEC_ALL else WORKERS):
        SERVERS.put(ForkServer())
    try:
        with ThreadPoolExecutor(WORKERS + 2) as pool:  # +2: the lock and interrupt scenarios mostly wait
            # The longest first: the scenarios with a process of their own, and the runs the cases read.
            futures: dict[str, Future] = {
                name: pool.submit(_timed, SCENARIOS[name], root) for name in ("lock", "interrupt-early")
            }
            builds = [
                pool.submit(command, ["train", *TINY, "--epochs", "2", "--out", "tiny"], root / "runs"),
                pool.submit(
                    command, ["train", *QUICK, "--hidden", "16", "--flow", "none", "--out", "tiny2d"], root / "runs"
                ),
            ]
            futures |= {
                name: pool.submit(_timed, SCENARIOS[name], root) for name in ("diverge-6", "diverge-2", "umask")
            }
            futures |= {c.id: pool.submit(_run_case, c, root) for c in CASES if not c.needs_runs}
            for build in builds:
                done = build.result()
                assert done.returncode == 0, done.stderr
            runs = snapshot(root / "runs")
            futures |= {
                name: pool.submit(_timed, scenario, root) for name, scenario in SCENARIOS.items() if name not in futures
            }
            futures |= {c.id: pool.submit(_run_case, c, root) for c in CASES if c.needs_runs}
            collected = {name: f.result() for name, f in futures.items()}
    finally:
        while not SERVERS.empty():
            SERVERS.get().close()
    collected["_runs_unchanged"] = runs == snapshot(root / "runs")
    collected["_seconds"] = time.perf_counter() - started
    return collected


def test_enough_cases():
    assert len({c.id for c in CASES}) == len(CASES)
    assert len(OWN) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, results: dict[str, Any]) -> None:
    result = results[case.id]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.rc == case.rc, result.stderr
    assert len(lines) == 1, result.stderr
    assert re.search(case.message, lines[0]), lines[0]
    assert re.match(r"flowvae( \w+)?: error: ", lines[0]), lines[0]
    assert result.stdout == "", result.stdout  # refused before any work
    assert result.after == result.before, "files changed or left behind"


def test_shared_runs_were_not_touched(results):
    assert results["_runs_unchanged"]


def test_second_training_into_one_directory_is_refused_naming_the_holder(results):
    result = results["lock"]
    for second in (result.extra["second"], result.extra["second_resume"]):
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines() == [
            f"flowvae train: error: run is in use by another flowvae process (pid {result.extra['pid']})"
        ]
    # Ctrl-C after a checkpoint: the run is kept and the message says how to go on.
    assert result.rc == 130 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1] == "flowvae train: interrupted; continue with: flowvae train "
        "--out run --resume"
    )
    assert (result.extra["dir"] / "run" / "checkpoint.pt").is_file()


def test_interrupt_before_the_first_checkpoint_leaves_nothing(results):
    result = results["interrupt-early"]
    if result.extra["checkpointed"]:
        pytest.skip("the first epoch ended before the interrupt arrived")
    assert result.rc == 130 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "flowvae train: interrupted before the first checkpoint; nothing was kept"
    ]
    assert result.after == {}, "the directories made for the run are removed"


def test_resume_applies_lr_and_records_the_change(results):
    result = results["resume-lr"]
    run = result.extra["dir"]
    assert result.rc == 0, result.stderr
    assert "Traceback" not in result.stderr
    with open(run / "metrics.csv") as f:
        assert [float(row["lr"]) for row in csv.DictReader(f)] == [1e-3, 1e-3, 5e-4]
    changes = torch.load(run / "checkpoint.pt", weights_only=True)["state"]["config_changes"]
    assert changes[-1]["lr"] == {"from": 1e-3, "to": 5e-4} and changes[-1]["epochs"] == {"from": 2, "to": 3}
    assert changes[-1]["patience"] == {"from": 20, "to": 7} and changes[-1]["max_minutes"] == {"from": None, "to": 30}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["lr"], saved["epochs"], saved["patience"], saved["max_minutes"], saved["seed"]) == (5e-4, 3, 7, 30, 0)
    assert not (run / ".metrics.csv.k2j4x9.flowvae-tmp").exists()
    assert (run / ".notes.tmp").read_text() == "a user's file"


def test_a_high_but_workable_lr_is_not_called_a_divergence(results):
    result = results["lr-0.1"]
    assert result.rc == 0, result.stderr
    printed = json.loads(result.stdout)
    assert 0 < printed["valid_neg_elbo"] < 64 * np.log(2) * 10


def test_last_good_names_only_weights_that_exist_and_are_sane(tmp_path):
    from types import SimpleNamespace

    from flowvae.models.likelihoods import Bernoulli
    from flowvae.training import RunState
    from flowvae.training.safeguards import last_good

    def run(epoch: int, best: float) -> SimpleNamespace:
        return SimpleNamespace(
            state=RunState(epoch=epoch, best_valid=best),
            out=tmp_path,
            model=SimpleNamespace(likelihood=Bernoulli()),
            data=SimpleNamespace(splits=SimpleNamespace(dim=64, kind="binary")),
        )

    assert last_good(run(0, float("inf"))) == "no checkpoint was written yet"
    (tmp_path / "best.pt").write_bytes(b"")
    assert last_good(run(2, 40.0)) == f"the last good weights are in {tmp_path / 'best.pt'}"
    assert last_good(run(2, 1e6)) == "no good weights were saved"
    assert last_good(run(2, float("nan"))) == "no good weights were saved"


@pytest.mark.parametrize("epochs", [2, 6])
def test_divergence_stops_with_a_clear_message(results, epochs):
    result = results[f"diverge-{epochs}"]
    lines = result.stderr.strip().splitlines()
    assert result.rc == 2 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert re.match(
        r"flowvae train: error: training diverged: .*no good weights were saved\. Lower --lr or set "
        r"--grad-clip$",
        lines[0],
    ), lines[0]
    assert result.stdout == ""
    run = result.extra["dir"]
    assert (run / "checkpoint.pt").is_file() and not (run / "results.json").exists()  # kept for a look, no results
    epochs_run = len((run / "metrics.csv").read_text().splitlines()) - 1
    assert epochs_run == min(epochs, 3)  # 3: stopped after three epochs beyond any sane -ELBO


def test_dataset_names_are_case_insensitive_and_files_follow_the_umask(results):
    result = results["umask"]
    assert result.rc == 0, result.stderr
    run = result.extra["dir"]
    assert yaml.safe_load((run / "config.yaml").read_text())["dataset"] == "digits"
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.iterdir() if p.is_file()}
    assert modes and set(modes.values()) == {0o600}, modes


def test_module_runtime(results):
    """Kept in view: the suite is meant to stay near a minute and a half on two free cores."""
    timed = sorted(((r.seconds, name) for name, r in results.items() if isinstance(r, Result)), reverse=True)
    print(
        f"bad-input suite: {len(CASES)} cases and {len(SCENARIOS)} scenarios in {results['_seconds']:.0f} s; "
        "slowest: " + ", ".join(f"{name} {seconds:.1f} s" for seconds, name in timed[:8])
    )
