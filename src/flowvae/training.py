"""Train any flowvae model: a plain loop in named steps, a checkpoint dict, a run directory.

    run = start_run(config, resume)          # build or resume: data, model, optimizer, RNG, state
    while not run_is_over(run):
        stats = train_epoch(run)             # one pass over the training set
        end_epoch(run, stats)                # validate, early stopping, lr decay, write files
    results = finish(run)                    # evaluate the best weights, write results.json

Run directory ``out/``:
    config.yaml          the configuration in effect
    curves.png           learning curves, redrawn every epoch (``flowvae curves RUN`` redraws it too)
    tensorboard/         with ``--tensorboard``: per-step and per-epoch scalars and image grids
    checkpoint.pt        model, EMA, optimizer, RNG states, run state and history (atomic; every epoch)
    best.pt              the evaluation weights with the best validation -ELBO
    metrics.jsonl/.csv   one row per epoch
    samples.png, reconstructions.png, results.json

``resume=True`` continues from ``checkpoint.pt``; the RNG states are restored (the CPU's, the run's
generators and, on CUDA, the device's global generator), so on a CPU a killed run resumed ends with
bit-identical parameters to a run that was never interrupted; on CUDA only with ``deterministic``
(cuDNN and atomics otherwise vary from run to run) and on the same device type.  The trainer asks
the model only what :class:`flowvae.models.LatentVariableModel` declares.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import fcntl
import io
import json
import logging
import math
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from flowvae import distributed, objectives, schedules
from flowvae.config import ConfigError, TrainConfig, resume_differences
from flowvae.data import DataError, DatasetSplits, load_dataset
from flowvae.data.files import ARRAYS, is_data_path, load_path
from flowvae.evaluation import autocast, evaluate, posterior_diagnostics
from flowvae.gradient_guard import MAX_CONSECUTIVE_SKIPS, GradientGuard
from flowvae.interrupts import raise_pending
from flowvae.io import (TEMP_SUFFIX, atomic_torch_save, atomic_write_text, existing_ancestor, probe_writable,
                        remove_stale_temporaries)
from flowvae.models import LatentVariableModel, as_unit_interval, build_model, count_parameters, draw_noise
from flowvae.models import MODEL_FIELDS
from flowvae.models.base import select_noise
from flowvae.optimizers import build_optimizer, set_weight_decay
from flowvae.parallelism import warn_if_oversubscribed
from flowvae.plots import save_image_grid
from flowvae.progress import Throughput, is_terminal, plain_line
from flowvae.report import plot_curves

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)            # format 1: flat config, no EMA (flowvae before hierarchical models)
GUARD_SYNC_STEPS = 50                # the gradient guard's counters reach the host this often, and per epoch
DIVERGED_EPOCHS = 3                  # validation -ELBO far above its best for this many epochs: diverged


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or belongs to another model."""


class RunDirError(RuntimeError):
    """A run directory that cannot be used: not writable, not a run, or in use by another process."""


def resolve_device(name: str) -> torch.device:
    """``'auto'`` (CUDA if available, else the CPU), ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` as a
    device; a one-line ``ValueError`` for a name that is wrong or unavailable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# --------------------------------------------------------------------------------------------- data

@dataclass
class PreparedData:
    """Splits ready for the model: valid/test of 'grayscale' data are binarized once (fixed seed)."""

    splits: DatasetSplits
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    train_eval: torch.Tensor   # the training set as evaluated (fixed binarization)
    dynamic: bool              # binarize training batches afresh


def prepare_data(config: TrainConfig, splits: DatasetSplits | None = None) -> PreparedData:
    """The run's data: ``splits`` when given (``flowvae.fit``), else ``config.dataset``'s, a
    registered name or a folder/.npy/.npz path (:mod:`flowvae.data.files`)."""
    if splits is None:
        splits = load_splits(config)
    for name, t in (("train", splits.train), ("valid", splits.valid), ("test", splits.test)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"{splits.name}: the {name} split contains NaN or infinite values")
        if len(t) == 0:
            raise DataError(f"{splits.name}: the {name} split is empty")
    dynamic = splits.kind == "grayscale"
    if dynamic:
        g = torch.Generator().manual_seed(config.seed + 1)
        fixed = [torch.bernoulli(t, generator=g) for t in (splits.valid, splits.test, splits.train)]
        return PreparedData(splits, splits.train, fixed[0], fixed[1], fixed[2], True)
    return PreparedData(splits, splits.train, splits.valid, splits.test, splits.train, False)


def load_splits(config: TrainConfig) -> DatasetSplits:
    """``config.dataset``'s splits: a registered name or a folder/.npy/.npz path."""
    if config.dataset == ARRAYS:
        raise DataError("this run was trained on arrays given to flowvae.fit, which it does not keep: give the "
                        "images as a file (flowvae evaluate --data PATH; TrainedRun.evaluate(path=...)), "
                        "or the arrays to flowvae.fit again to resume")
    if is_data_path(config.dataset):
        return load_path(config.dataset, kind=config.data_kind, valid_fraction=config.valid_fraction,
                         test_fraction=config.test_fraction, seed=config.seed)
    return load_dataset(config.dataset, config.data_dir, seed=config.seed)


def model_class(model: torch.nn.Module) -> str:
    """``module.QualifiedName`` of the model's class, recorded with its weights."""
    return f"{type(model).__module__}.{type(model).__qualname__}"


def model_from_config(config: TrainConfig, image_shape, data_kind: str) -> LatentVariableModel:
    """The model that ``config.model`` describes, for images (C, H, W) of ``data_kind``."""
    return build_model(config.model, image_shape, data_kind)


# -------------------------------------------------------------------------------------- checkpoints

def load_checkpoint(path: str | Path, config: TrainConfig | None = None, *, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); check it was written for ``config``'s model.

    Checkpoints of format 1 (flat config) are read too; their config is upgraded on the fly.
    ``mmap=True`` maps the tensors instead of reading them: a cheap look at the config and state."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for truncated/corrupt/foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a flowvae checkpoint "
                              f"({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a flowvae checkpoint (formats {READABLE_FORMATS})")
    if not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} has no config; it was not written by flowvae train")
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    if config is not None:
        try:
            refused, _ = resume_differences(ckpt["config"], config)
        except ConfigError as err:
            raise CheckpointError(f"checkpoint {path} has an unreadable config: {err}") from None
        if refused:
            what = "model" if any(r.split("=")[0] in MODEL_FIELDS for r in refused) else "run"
            raise CheckpointError(f"checkpoint {path} was written for a different {what}: {'; '.join(refused)}")
    return ckpt


def load_weights(model: torch.nn.Module, weights: Any, path: Path) -> None:
    """``model.load_state_dict`` with a one-line error for weights of another model or non-finite weights."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError, KeyError) as err:
        # torch's message opens with "Error(s) in loading state_dict for VAE:"; the first problem follows.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if not line.startswith("Error(s) in loading")), None)
        detail = (detail or type(err).__name__).rstrip(".")
        if len(lines) > 2:
            detail += f" (and {len(lines) - 2} more)"
        raise CheckpointError(f"checkpoint {path} does not fit this model: {detail}") from None
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); "
                              "it cannot be evaluated or resumed")


# ------------------------------------------------------------------------------------ the run state

@dataclass
class RunState:
    """Everything about the run's progress that a checkpoint must carry."""

    epoch: int = 0
    step: int = 0
    best_valid: float = math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    skipped_updates: int = 0
    consecutive_skips: int = 0
    log_grad_norm_level: float | None = None    # the gradient guard's running level of log ‖g‖
    diverging_epochs: int = 0
    lr_total_steps: float | None = None          # the lr schedule's length in steps, as the budget allows
    history: list[dict[str, Any]] = field(default_factory=list)
    config_changes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Run:
    """A run in progress: what :func:`train_epoch` and :func:`end_epoch` work on."""

    config: TrainConfig
    context: distributed.Context
    device: torch.device
    out: Path
    data: PreparedData
    model: LatentVariableModel
    step_model: torch.nn.Module                 # the model as stepped: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generators: dict[str, torch.Generator]
    state: RunState
    ema: torch.optim.swa_utils.AveragedModel | None = None
    guard: GradientGuard | None = None           # built by start_run
    tensorboard: Any = None                      # a flowvae.tensorboard.TensorBoardLogger on worker 0
    clock: Callable[[], float] = lambda: 0.0     # seconds of training so far, resumed runs included

    @property
    def eval_model(self) -> LatentVariableModel:
        """The weights evaluated: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def eval_kwargs(self) -> dict[str, Any]:
        return {"batch_size": self.config.eval_batch_size, "device": self.device, "seed": self.config.seed,
                "context": self.context, "precision": self.config.precision}


# ----------------------------------------------------------------------------- the run's directory

LOCK_NAME = ".flowvae.lock"
SHARED_PROBE_NAME = ".flowvae.shared"
RUN_FILES = ("config.yaml", LOCK_NAME, SHARED_PROBE_NAME)


def _prepare_out_dir(out: Path, resume: bool) -> Path | None:
    """Check ``out`` can hold this run; returns the topmost directory created now (``out`` or one of
    its parents), or None.  One-line errors."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory")
    parent = existing_ancestor(out)
    if not parent.is_dir():
        raise RunDirError(f"--out {out}: {parent} is a file, not a directory")
    if (out / LOCK_NAME).exists() or (out / LOCK_NAME).is_symlink():  # another process at work here comes first
        with _open_lock(out, create=False) as handle:
            _take_lock(handle, out)
            fcntl.flock(handle, fcntl.LOCK_UN)
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise CheckpointError(f"--resume given but {out / 'checkpoint.pt'} does not exist")
        return None
    if (out / "checkpoint.pt").exists():
        raise CheckpointError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if out.is_dir() and any(p.name not in RUN_FILES for p in out.iterdir()) and not interrupted_start(out):
        raise RunDirError(f"--out {out} is a non-empty directory that holds no flowvae run; choose another --out")
    missing = [d for d in (out, *out.parents) if not d.exists()]
    created = missing[-1] if missing else None
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_writable(out)
    except OSError as err:
        if created is not None:
            _remove_failed_start(out, created, ours=False)
        raise RunDirError(f"--out {out} cannot be written: {err.strerror}") from None
    return created


def _open_lock(out: Path, create: bool = True) -> Any:
    """The run's lock file, opened for reading and writing without following a symbolic link: a lock
    that is a link, a FIFO or anything but a regular file is refused, so nothing outside the run is
    ever written through it."""
    path = out / LOCK_NAME
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP or path.is_symlink():
            raise RunDirError(f"{path} is a symbolic link; flowvae does not write through it (remove it)") from None
        raise RunDirError(f"--out {out} cannot be written: {path}: {err.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirError(f"{path} is not a regular file; flowvae does not write to it (remove it)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+")


def interrupted_start(out: Path) -> list[Path]:
    """The files that a new run killed before its first checkpoint left in ``out`` (config.yaml, the
    first epoch's best.pt, metrics, curves, TensorBoard events, temporaries), the lock excepted;
    [] when ``out`` holds a checkpoint or anything else, which is then never taken for debris."""
    if not out.is_dir() or (out / "checkpoint.pt").exists() or (out / "checkpoint.pt").is_symlink():
        return []
    entries = [p for p in out.iterdir() if p.name != LOCK_NAME]
    files = {"config.yaml", "best.pt", "metrics.jsonl", "metrics.csv", "curves.png"}
    for p in entries:
        ours = (p.name in files or p.name.endswith(TEMP_SUFFIX)) and p.is_file() and not p.is_symlink()
        if not (ours or (p.name == "tensorboard" and p.is_dir() and not p.is_symlink())):
            return []
    if not (out / "config.yaml").is_file() and not all(p.name.endswith(TEMP_SUFFIX) for p in entries):
        return []  # flowvae writes config.yaml before any other file: without it, these are someone else's
    if (out / "best.pt").exists():  # the first epoch's weights only: a later epoch's are a user's result
        try:
            epoch = torch.load(out / "best.pt", map_location="cpu", weights_only=True, mmap=True).get("epoch")
        except Exception:  # noqa: BLE001 (a truncated write is debris too)
            epoch = None
        if epoch not in (None, 1):
            return []
    return entries


def _clear_interrupted_start(out: Path) -> None:
    for path in interrupted_start(out):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        logger.info("removed %s, left by a start that was interrupted before its first checkpoint", path)


def _take_lock(handle: Any, out: Path) -> None:
    """Lock the open lock file without waiting, or raise a one-line error naming its holder's pid."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        raise RunDirError(f"{out} is in use by another flowvae process (pid {holder})") from None


@contextlib.contextmanager
def run_lock(out: Path, on_error: Callable[[], None] | None = None):
    """Hold an exclusive lock on the run directory; a second process gets a one-line error.
    When the body raises, temporaries are removed and ``on_error`` runs, still under the lock."""
    handle = _open_lock(out)
    try:
        _take_lock(handle, out)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        except BaseException:
            remove_stale_temporaries(out)  # a write cut short by a signal between mkstemp and its try
            if on_error is not None:
                on_error()
            raise
    finally:
        handle.close()


# ----------------------------------------------------------------------------- start or resume a run

def _build_ema(config: TrainConfig, model: torch.nn.Module) -> torch.optim.swa_utils.AveragedModel | None:
    if not config.ema:
        return None
    from torch.optim.swa_utils import AveragedModel

    # The container only (weights and n_averaged, saved with the run): GradientGuard does the averaging.
    ema = AveragedModel(model, use_buffers=True)
    # n_averaged on the model's device: on the CPU its per-step update would be a device-to-host copy.
    ema.n_averaged = torch.zeros((), dtype=torch.long, device=next(model.parameters()).device)
    return ema


def configure_backends(config: TrainConfig, device: torch.device) -> None:
    """Numerics switches: TF32 (``tf32``), deterministic algorithms (``deterministic``); cuDNN's
    autotuning (``cudnn.benchmark``, which changes no precision) unless ``deterministic``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":
        warn_if_oversubscribed(torch.get_num_threads())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
        torch.set_float32_matmul_precision("high" if config.tf32 else "highest")
        torch.backends.cudnn.benchmark = not config.deterministic
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=False)


def require_visible(path: Path, context: distributed.Context, device: torch.device) -> None:
    """Every worker must see ``path``: flowvae needs ``--out`` on a filesystem that all nodes share."""
    if not context.distributed:
        return
    missing = torch.tensor(0.0 if path.is_file() else 1.0, device=device)
    if context.all_reduce_sum(missing).item() > 0:
        raise CheckpointError(f"{int(missing.item())} worker(s) cannot see {path}: with several nodes, --out must "
                              "be on a filesystem that all of them share")


def require_shared_out(out: Path, context: distributed.Context, device: torch.device) -> None:
    """Every worker must see what worker 0 writes in ``out``: checked before any work, with a file
    of a random token that worker 0 writes, every worker reads, and worker 0 removes."""
    if not context.distributed:
        return
    probe = out / SHARED_PROBE_NAME
    token = torch.zeros((), dtype=torch.int64, device=device)
    if context.is_main:
        token.fill_(int.from_bytes(os.urandom(7), "little"))
        atomic_write_text(probe, str(int(token)))
    context.all_reduce_sum(token)  # every worker gets worker 0's token, after the file is written
    try:
        seen = probe.read_text().strip() == str(int(token))
    except OSError:
        seen = False
    missing = context.all_reduce_sum(torch.tensor(0.0 if seen else 1.0, device=device))
    if context.is_main:
        probe.unlink(missing_ok=True)
    if missing.item() > 0:
        raise RunDirError(f"{int(missing.item())} worker(s) cannot see {out}: with several nodes, --out must be on "
                          "a filesystem that all of them share")


def start_run(config: TrainConfig, resume: bool, context: distributed.Context, device: torch.device,
              splits: DatasetSplits | None = None, model: LatentVariableModel | None = None) -> Run:
    """Build the data, model and optimizer (or take ``splits`` and ``model`` given to :func:`train`);
    on ``resume`` restore them from ``checkpoint.pt``."""
    out = Path(config.out)
    configure_backends(config, device)
    torch.manual_seed(config.seed)
    data = prepare_data(config, splits)
    if device.type == "cuda":  # the training set lives on the GPU: no host gather or copy per step
        data = dataclasses.replace(data, train=data.train.to(device))
    if model is None:
        model = model_from_config(config, data.splits.image_shape, data.splits.kind)
    model = model.to(device)
    if config.gradient != "reparam" and model.path_gradient_problem():
        raise ConfigError(f"--gradient {config.gradient} is not implemented for {model.path_gradient_problem()} "
                          "(only for a diagonal Gaussian posterior without a flow); use --gradient reparam")
    optimizer = build_optimizer(config, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    # Shuffling and binarization (CPU) and the posterior's noise (device): the same on every worker.
    generators = {"shuffle": torch.Generator().manual_seed(config.seed),
                  "noise": torch.Generator(device).manual_seed(config.seed + 2)}
    if device.type != "cpu":  # dynamic binarization where the data are (on a CPU it draws from "shuffle")
        generators["binarize"] = torch.Generator(device).manual_seed(config.seed + 3)
    state = RunState()
    if resume:
        require_visible(out / "checkpoint.pt", context, device)
        ckpt = load_checkpoint(out / "checkpoint.pt", config)
        load_weights(model, ckpt["model"], out / "checkpoint.pt")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as error:  # e.g. a planar stack saved as one-step modules (older flowvae)
            raise CheckpointError(f"cannot resume from {out / 'checkpoint.pt'}: its optimizer state does not match "
                                  f"this model's parameters ({error}); its weights still load with "
                                  "'flowvae evaluate', or start a new run") from None
        state = RunState(**{k: v for k, v in ckpt["state"].items() if k in RunState.__dataclass_fields__},
                         history=ckpt["history"])
        _restore_rng(ckpt["rng"], generators, device, config, state)
        _apply_changes(ckpt["config"], config, optimizer, state)
    elif hasattr(model, "initialise"):  # data-dependent initialisation (weight normalization)
        with torch.no_grad():
            model.initialise(data.train[:config.batch_size].to(device))
    if config.output_bias_init and not resume:
        model.init_output_bias(as_unit_interval(data.train, torch.float64).mean(0).to(device))
    ema = _build_ema(config, model)
    if ema is not None and resume and ckpt.get("ema") is not None:
        load_weights(ema, ckpt["ema"], out / "checkpoint.pt")
    elif ema is not None and resume:  # --ema switched on now: the average starts from the resumed weights
        logger.warning("the run was trained without --ema: its moving average starts from the weights of epoch %d",
                       state.epoch)
    step_model: torch.nn.Module = model
    if context.distributed:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            gradient_as_bucket_view=True)
    if config.compile:
        step_model = torch.compile(step_model)
    guard = GradientGuard(model, optimizer, scaler, max_norm=config.grad_clip, skip_factor=config.grad_skip,
                          device=device, ema=ema, ema_decay=config.ema)
    guard.load(state.log_grad_norm_level, state.skipped_updates, state.consecutive_skips)
    return Run(config, context, device, out, data, model, step_model, optimizer, scaler, generators, state, ema,
               guard)


def _device_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The CUDA device's global generator (what draws without a generator, e.g. the Gaussian
    likelihood's dequantization noise), saved with the run: {} on a CPU, whose global state is saved apart."""
    return {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}


def _restore_rng(saved: dict[str, torch.Tensor], generators: dict[str, torch.Generator], device: torch.device,
                 config: TrainConfig, state: RunState) -> None:
    torch.set_rng_state(saved["torch"])
    generators["shuffle"].set_state(saved["shuffle"])
    saved_device = saved.get("noise_device", "cpu")  # format 1 checkpoints were all written on CPUs
    device_generators = [name for name in generators if name != "shuffle"]
    if saved_device == device.type:
        with contextlib.suppress(RuntimeError, KeyError):
            for name in device_generators:
                generators[name].set_state(saved[name])
            if "cuda" in saved and device.type == "cuda":  # absent from checkpoints of flowvae before this
                torch.cuda.set_rng_state(saved["cuda"], device)
            return
    # A generator's state is device-specific: reseed from (seed, step), deterministically, and say so.
    for offset, name in enumerate(device_generators):
        generators[name].manual_seed(config.seed * 1_000_003 + state.step + 2 + offset)
    logger.warning("resumed on %s a run saved on %s: the posterior noise is reseeded from (seed, step), so the "
                   "run continues deterministically but not bit-identically", device.type, saved_device)


def _apply_changes(saved_config: dict[str, Any], config: TrainConfig, optimizer: torch.optim.Optimizer,
                   state: RunState) -> None:
    """Options that may change on resume take effect now, and the change is recorded."""
    _, changed = resume_differences(saved_config, config)
    if "lr" in changed:
        for group in optimizer.param_groups:
            group["lr"] = config.lr
    if "weight_decay" in changed:
        set_weight_decay(optimizer, config.weight_decay)
    if changed:
        state.config_changes.append({"epoch": state.epoch, "step": state.step,
                                     **{k: {"from": old, "to": new} for k, (old, new) in changed.items()}})
        logger.warning("resumed with changed options: %s",
                       ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))


# --------------------------------------------------------------------------------------- one epoch

def _guarded_step(run: Run, loss: torch.Tensor) -> torch.Tensor:
    """Backpropagate and update unless the gradient is non-finite or a spike (see
    :mod:`flowvae.gradient_guard`); returns that decision as a device tensor.  The guard's counters
    reach the host every :data:`GUARD_SYNC_STEPS` steps, where a diverged run stops."""
    made = run.guard.step(loss, run.state.step)
    if (run.state.step + 1) % GUARD_SYNC_STEPS == 0:
        _sync_guard(run)
    return made


def _sync_guard(run: Run) -> None:
    """Copy the guard's counters into the run's state (one host sync); stop a run whose updates
    have all been skipped for ``MAX_CONSECUTIVE_SKIPS`` steps."""
    state = run.state
    state.log_grad_norm_level, state.skipped_updates, state.consecutive_skips = run.guard.sync()
    if state.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
        raise FloatingPointError(f"training diverged: {state.consecutive_skips} updates in a row had a non-finite "
                                 f"or exploding gradient (step {state.step}); {_last_good(run)}. Lower --lr or "
                                 "set --grad-clip")


def _sane_limit(run: Run) -> float:
    """The largest sane -ELBO in the model's own nats: 10x that of a model that puts equal mass on
    every pixel value (D·log 2 for binary data, D·log 256 for 8-bit), less the likelihood's
    dequantization offset.  Only a divergence gets beyond it: an untrained model is near 1x."""
    splits = run.data.splits
    limit = 10 * splits.dim * math.log(256 if splits.kind == "8bit" else 2)
    return limit - run.model.likelihood.discrete_nats_offset(splits.dim)


def _is_sane(run: Run, neg_elbo: float) -> bool:
    return math.isfinite(neg_elbo) and neg_elbo <= _sane_limit(run)


def _last_good(run: Run) -> str:
    if not _is_sane(run, run.state.best_valid) and run.state.epoch > 0:
        return "no good weights were saved"
    for name in ("best.pt", "checkpoint.pt"):
        if (run.out / name).is_file():
            return f"the last good weights are in {run.out / name}"
    return "no checkpoint was written yet"


def _shard(batch: int, context: distributed.Context) -> slice:
    """Worker r's contiguous part of a global batch, as ``torch.tensor_split`` would cut it."""
    base, extra = divmod(batch, context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return slice(start, start + base + (context.rank < extra))


def _noisy_input(run: Run, x: torch.Tensor) -> torch.Tensor:
    """The encoder's input in training: x in [0, 1] plus N(0, input_noise²) noise, drawn for the
    global batch from the noise generator (amortized inference regularization, Shu et al. 2018)."""
    x = as_unit_interval(x.to(run.device), run.model.dtype)
    return x + run.config.input_noise * torch.randn(x.shape, generator=run.generators["noise"], device=run.device,
                                                    dtype=x.dtype)


def _schedule_lr(run: Run, steps_per_epoch: int) -> None:
    """This step's learning rate from the budget-aware schedule (:mod:`flowvae.schedules`)."""
    config, state = run.config, run.state
    total = state.lr_total_steps or config.epochs * steps_per_epoch
    lr = schedules.scheduled_lr(config.lr_schedule, config.lr, config.lr_floor, state.step + 1, total)
    for group in run.optimizer.param_groups:
        group["lr"] = lr


def train_epoch(run: Run) -> dict[str, float]:
    """One pass over the training set in global batches; every worker takes its shard."""
    config, state, data, context, device = run.config, run.state, run.data, run.context, run.device
    run.model.train()
    n_train = len(data.train)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    warmup_steps = config.warmup_epochs * steps_per_epoch
    order = torch.randperm(n_train, generator=run.generators["shuffle"]).to(data.train.device)
    binarize = run.generators.get("binarize", run.generators["shuffle"])
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    beta = 1.0
    throughput = Throughput()
    bar = tqdm(range(0, n_train, config.batch_size), desc=f"epoch {state.epoch + 1}", leave=False, unit="step",
               disable=not _bars(run))
    for start in bar:
        x = data.train[order[start:start + config.batch_size]]  # the global batch
        global_batch = len(x)
        if data.dynamic:
            x = torch.bernoulli(x, generator=binarize)
        samples = config.train_samples
        raise_pending()  # a Ctrl-C that landed in a finalizer, where Python only prints it
        noise = draw_noise(run.model, samples, global_batch, generator=run.generators["noise"], device=device)
        encoder_input = _noisy_input(run, x) if config.input_noise > 0 else None
        shard = _shard(global_batch, context)                    # this worker's contiguous slice
        x, noise = x[shard].to(device, non_blocking=True), select_noise(noise, shard)
        if encoder_input is not None:
            encoder_input = encoder_input[shard]
        beta = min(1.0, (state.step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if config.lr_schedule != "constant":
            _schedule_lr(run, steps_per_epoch)
        with autocast(device, config.precision):
            ld = run.step_model(x, samples, noise=noise, path_gradient=config.gradient != "reparam",
                                encoder_input=encoder_input)
        # Σ over the shard / (global batch / W): DDP's gradient average is then the global batch mean.
        loss = objectives.training_loss(ld, beta, config.free_bits, normalizer=global_batch / context.world_size,
                                        objective=config.objective, gradient=config.gradient)
        _guarded_step(run, loss)
        loss_sum += torch.where(torch.isfinite(loss), loss.detach() * (global_batch / context.world_size), 0.0)
        state.step += 1
        if run.tensorboard is not None:  # worker 0's shard, read on the host every step
            run.tensorboard.scalars(state.step, {
                "train/loss": loss.item(), "train/reconstruction": -ld.log_likelihood.detach().mean().item(),
                "train/kl": ld.kl.detach().mean().item(), "train/beta": beta,
                "train/lr": run.optimizer.param_groups[0]["lr"], "train/skipped_updates": run.guard.skipped.item()})
        throughput.add(global_batch)
        if not bar.disable and throughput.due():  # a windowed rate, refreshed every second
            bar.set_postfix(loss=f"{loss.item():.2f}", img_s=f"{throughput.images_per_second():.0f}")
    bar.close()
    _sync_guard(run)
    loss_sum = context.all_reduce_sum(loss_sum)  # the one collective of the epoch outside DDP's own
    seconds = throughput.seconds()
    return {"train_loss": loss_sum.item() / n_train, "beta": beta, "seconds": seconds,
            "images_per_s": n_train / max(seconds, 1e-9)}


def _bars(run: Run) -> bool:
    """Progress bars: asked for, worker 0, and a terminal to draw them on (else plain lines per epoch)."""
    return run.config.progress and run.context.is_main and is_terminal()


# ------------------------------------------------------------------------------------ end of epoch

def end_epoch(run: Run, stats: dict[str, float]) -> None:
    """Validate, keep the best weights, decay the learning rate, stop early or on divergence, write."""
    config, state = run.config, run.state
    valid = evaluate(run.eval_model, run.data.valid, **run.eval_kwargs())
    state.epoch += 1
    state.train_seconds = run.clock()
    if config.lr_schedule != "constant" and config.max_minutes:  # worker 0's rate, so all workers agree
        seconds = torch.tensor(float(run.context.is_main) * state.train_seconds, dtype=torch.float64,
                               device=run.device)
        steps = config.epochs * math.ceil(len(run.data.train) / config.batch_size)
        state.lr_total_steps = schedules.budget_steps(state.step, run.context.all_reduce_sum(seconds).item(),
                                                      config.max_minutes, steps)
    row = {"epoch": state.epoch, "step": state.step, "beta": stats["beta"], "train_loss": stats["train_loss"],
           "valid_neg_elbo": valid["neg_elbo"], "valid_reconstruction": valid["reconstruction"],
           "valid_kl": valid["kl"], "lr": run.optimizer.param_groups[0]["lr"],
           "skipped_updates": state.skipped_updates, "seconds": round(state.train_seconds, 3)}
    if len(valid["kl_groups"]) > 1:
        row |= {f"valid_kl_{name}": value for name, value in valid["kl_groups"].items()}
    state.history.append(row)
    improved = valid["neg_elbo"] < state.best_valid
    if improved:
        state.best_valid, state.best_epoch, state.epochs_since_best = valid["neg_elbo"], state.epoch, 0
    else:
        state.epochs_since_best += 1
        if config.lr_decay < 1 and state.epochs_since_best % config.lr_patience == 0:
            for group in run.optimizer.param_groups:  # saved with the optimizer's state, so resume keeps it
                group["lr"] *= config.lr_decay
    if config.patience and state.epochs_since_best >= config.patience:
        state.stopped_early = True
    if run.context.is_main:
        write_epoch(run, improved)
    line = (f"epoch {state.epoch}/{config.epochs}  train loss {row['train_loss']:.3f}  valid -ELBO "
            f"{valid['neg_elbo']:.3f}  (β={stats['beta']:.2f})  {stats['seconds']:.1f} s  "
            f"{stats['images_per_s']:.0f} images/s")
    if logger.isEnabledFor(logging.INFO):
        logger.info(line)
    elif config.progress and run.context.is_main and not is_terminal():  # a log file: plain lines, no bars
        plain_line(line)
    _check_divergence(run, valid["neg_elbo"])


def _check_divergence(run: Run, valid_neg_elbo: float) -> None:
    """Stop with a clear message when the validation -ELBO stays far above its best, or beyond any
    sane value (:func:`_sane_limit`), for DIVERGED_EPOCHS epochs, or when the run ends with no sane
    weights at all."""
    state, splits = run.state, run.data.splits

    def insane(value: float) -> bool:
        return not _is_sane(run, value)

    far_above = insane(valid_neg_elbo) or (
        math.isfinite(state.best_valid) and valid_neg_elbo > state.best_valid + max(10.0, 0.5 * abs(state.best_valid)))
    state.diverging_epochs = state.diverging_epochs + 1 if far_above else 0
    sane = f"{_sane_limit(run):.4g} nats (10x that of equal mass on every value of the {splits.dim} pixels)"
    advice = "Lower --lr or set --grad-clip"
    if state.diverging_epochs >= DIVERGED_EPOCHS:
        where = f"beyond {sane}" if insane(valid_neg_elbo) else \
            f"against its best {state.best_valid:.4g} (epoch {state.best_epoch})"
        raise FloatingPointError(f"training diverged: valid -ELBO {valid_neg_elbo:.4g} for {state.diverging_epochs} "
                                 f"epochs, {where}; {_last_good(run)}. {advice}")
    if insane(state.best_valid) and run_is_over(run):
        raise FloatingPointError(f"training diverged: the run ends with a best valid -ELBO of {state.best_valid:.4g}, "
                                 f"beyond {sane}; {_last_good(run)}. {advice}")


def write_epoch(run: Run, improved: bool) -> None:
    """Worker 0: checkpoint.pt, then best.pt (if improved), metrics.jsonl/.csv — each written atomically.

    checkpoint.pt comes first, so best.pt is never ahead of it: should best.pt's write fail (a full
    disk), the checkpoint holds the same weights and :func:`_repair_best` rewrites it on resume.
    Both record the data's description, so that inference needs no data files."""
    data = run_data_description(run)
    atomic_torch_save({
        "format": CHECKPOINT_FORMAT, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "data": data,
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "config": run.config.to_dict(), "state": {k: v for k, v in dataclasses.asdict(run.state).items()
                                                  if k != "history"},
        "history": run.state.history,
        "rng": {"torch": torch.get_rng_state(), "noise_device": run.device.type, **_device_rng_state(run.device),
                **{k: g.get_state() for k, g in run.generators.items()}},
    }, run.checkpoint_path)
    if improved:
        _write_best(run)
    _write_history(run.out, run.state.history)
    plot_curves(run.state.history, run.out / "curves.png", title=f"{run.config.dataset}, {run.config.model.arch}")
    if run.tensorboard is not None:
        _log_epoch_to_tensorboard(run)


def run_data_description(run: Run) -> dict[str, Any]:
    """The data's name, kind, image shape and split sizes, and the model's class: what a checkpoint
    records so that inference needs no data files."""
    return run.data.splits.describe() | {"model_class": model_class(run.model)}


def _write_best(run: Run) -> None:
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "model": run.eval_model.state_dict(),
                       "config": run.config.to_dict(), "epoch": run.state.epoch, "data": run_data_description(run)},
                      run.out / "best.pt")


def _repair_best(run: Run) -> None:
    """On resume: a best.pt behind the checkpoint's best epoch (its write failed after the checkpoint's)
    is rewritten from the checkpoint, whose evaluation weights are then the best ones; the metrics
    files are rewritten from the checkpoint's history."""
    state, path = run.state, run.out / "best.pt"
    if state.best_epoch == state.epoch > 0:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
        except Exception:  # missing, truncated or foreign: rewritten below  # noqa: BLE001
            saved = None
        if saved != state.best_epoch:
            logger.warning("%s was behind %s (epoch %s, best %d): rewritten from the checkpoint", path,
                           run.checkpoint_path, saved, state.best_epoch)
            _write_best(run)
    _write_history(run.out, state.history)


IMAGES_EVERY_EPOCHS = 5


def _log_epoch_to_tensorboard(run: Run) -> None:
    row, step = run.state.history[-1], run.state.step
    run.tensorboard.scalars(step, {f"valid/{k.removeprefix('valid_')}": v for k, v in row.items()
                                   if k.startswith("valid_")} | {"epoch/lr": row["lr"],
                                                                  "epoch/skipped_updates": row["skipped_updates"]})
    if row["epoch"] % IMAGES_EVERY_EPOCHS == 1 or IMAGES_EVERY_EPOCHS == 1:
        model = run.eval_model
        generator = torch.Generator(run.device).manual_seed(run.config.seed)
        run.tensorboard.images("samples", model.sample(64, generator), step)
        originals = run.data.valid[:32].to(run.device)
        recon = model.reconstruct(originals)
        pairs = torch.stack([as_unit_interval(originals, recon.dtype), recon], 1).flatten(0, 1)
        run.tensorboard.images("reconstructions", pairs, step)
    run.tensorboard.flush()


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    if history:
        buffer = io.StringIO()
        names = list(dict.fromkeys(k for row in history for k in row))
        writer = csv.DictWriter(buffer, fieldnames=names)
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(out / "metrics.csv", buffer.getvalue())


# ------------------------------------------------------------------------------------------- train

def train(config: TrainConfig, *, resume: bool = False, splits: DatasetSplits | None = None,
          model: LatentVariableModel | None = None, notices: Sequence[str] = ()) -> dict[str, Any]:
    """Train, early-stop on validation -ELBO, evaluate the best model; returns results.json's content.

    ``splits`` replaces ``config.dataset``'s data and ``model`` the model that ``config.model``
    describes (``flowvae.fit`` passes a user's arrays and model this way).

    Under ``torchrun`` the model is wrapped in DistributedDataParallel: every worker draws the same
    global batch, noise and binarization from shared generators and takes its shard, and the loss is
    scaled so that the averaged gradient equals the single-process gradient of the global batch.
    So a run gives the same parameters on any number of workers (up to float summation order) and
    a checkpoint resumes on any number of workers.  Only worker 0 writes files.

    Args:
        config: the run's options; ``config.out`` is the run directory (new, or ``resume``).
        resume: continue the run in ``config.out`` from its ``checkpoint.pt``.
        splits: data to train on instead of ``config.dataset``'s.
        model: a model to train instead of the one ``config.model`` describes.
        notices: warnings (e.g. options that have no effect), logged once the run has started.

    Returns:
        The content of ``results.json``: -ELBO on every split, the test -log p(x) with K =
        ``config.eval_samples``, the data's description, diagnostics.

    Raises:
        ConfigError: a bad option (DataError, CheckpointError and RunDirError likewise name bad data,
            checkpoints and run directories, in one line; a new run that fails before its first
            checkpoint leaves nothing behind).

    Examples:
        >>> import tempfile
        >>> from flowvae.config import TrainConfig
        >>> out = tempfile.mkdtemp() + "/run"
        >>> config = TrainConfig.from_dict({"dataset": "digits", "epochs": 1, "hidden": 16, "latent_dim": 2,
        ...                                 "eval_samples": 5, "progress": False, "out": out})
        >>> results = train(config)
        >>> test, data = results["test"], results["data"]
        >>> results["epochs_trained"], test["nll_samples"], data["image_shape"]
        (1, 5, [1, 8, 8])
    """
    config.validate()
    context, device_name = distributed.setup(config.device)
    out = Path(config.out)
    created: Path | None = None  # the topmost directory this call created, removed again if the start fails
    try:
        device = resolve_device(device_name)
        if resume and not (out / "checkpoint.pt").exists() and interrupted_start(out):
            logger.warning("%s holds no checkpoint, only the files of a start interrupted before its first "
                           "checkpoint: starting the run afresh", out)
            resume = False
        if context.is_main:
            created = _prepare_out_dir(out, resume)
            if config.tensorboard:
                from flowvae.tensorboard import check_log_dir

                check_log_dir(out)
        require_shared_out(out, context, device)  # before any work: not at the end of training
        if resume:  # refuse another run's options before loading any data (a cheap, memory-mapped look)
            ckpt = load_checkpoint(out / "checkpoint.pt", config, mmap=True)
            missing = [k for k in ("optimizer", "state", "history", "rng") if not isinstance(ckpt.get(k), (dict, list))]
            if missing:
                raise CheckpointError(f"{out / 'checkpoint.pt'} has no {', '.join(missing)}: it holds weights only "
                                      "(like best.pt) and cannot be resumed")
            done = ckpt["state"].get("epoch", 0)
            del ckpt
            if config.epochs < done:
                raise ConfigError(f"--epochs {config.epochs} is below the {done} epochs {out} has already trained; "
                                  f"give --epochs {done} or more")
        context.barrier()

        def undo_failed_start() -> None:  # run by run_lock on an error, still holding the lock
            if not resume and not (out / "checkpoint.pt").exists():
                _remove_failed_start(out, created, ours=True)  # a new run that failed leaves nothing

        with run_lock(out, on_error=undo_failed_start) if context.is_main else contextlib.nullcontext():
            run = start_run(config, resume, context, device, splits, model)
            tf32 = [f"--tf32 has no effect on {device.type}; it acts only on CUDA devices"] \
                if config.tf32 and device.type != "cuda" else []
            for message in [*notices, *tf32] if context.is_main else []:
                logger.warning("warning: %s", message)
            if context.is_main and not resume:
                _clear_interrupted_start(out)
            if context.is_main and config.tensorboard:
                from flowvae.tensorboard import TensorBoardLogger

                run.tensorboard = TensorBoardLogger(out, resume_step=run.state.step + 1 if resume else None)
            if context.is_main:  # every check has passed: only now does the run's directory change
                for path in remove_stale_temporaries(out):
                    logger.info("removed %s, left by an interrupted write", path)
                atomic_write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
                if resume:
                    _repair_best(run)
            logger.info("%s: %d parameters, %s, %d workers, %d training images", config.dataset,
                        count_parameters(run.model), device, context.world_size, len(run.data.train))
            started = time.perf_counter() - run.state.train_seconds
            run.clock = lambda: time.perf_counter() - started
            epochs = tqdm(total=config.epochs, initial=min(run.state.epoch, config.epochs),
                          desc=f"epochs (then the test -log p(x) with K={config.eval_samples})", disable=not _bars(run))
            while not run_is_over(run):
                stats = train_epoch(run)
                end_epoch(run, stats)
                epochs.update(1)
                epochs.set_postfix(loss=f"{stats['train_loss']:.2f}", valid=f"{run.state.history[-1]['valid_neg_elbo']:.2f}")
            epochs.close()
            if run.tensorboard is not None:
                run.tensorboard.close()
            context.barrier()
            return finish(run)
    except BaseException:
        if context.is_main and created is not None and not (out / "checkpoint.pt").exists():
            _remove_failed_start(out, created, ours=False)  # e.g. the lock could not be taken: empty dirs only
        raise
    finally:
        distributed.teardown()


def _remove_failed_start(out: Path, created: Path | None, *, ours: bool) -> None:
    """Undo a start that failed before its first checkpoint.  ``ours``: this process held the run's
    lock, so every flowvae file in ``out`` is its own (a new run starts in a directory holding at most
    config.yaml and the lock) and is removed; then the directories it created, if empty."""
    if ours:
        for name in (*RUN_FILES, "best.pt", "metrics.jsonl", "metrics.csv", "curves.png"):
            (out / name).unlink(missing_ok=True)
        if (out / "tensorboard").is_dir() and not (out / "tensorboard").is_symlink():
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        remove_stale_temporaries(out)
    if created is None:
        return
    for directory in (out, *out.parents):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only succeeds when empty: a user's file is never removed
        if directory == created or directory.exists():
            break


def run_is_over(run: Run) -> bool:
    """All epochs done, stopped early, or the time budget spent."""
    state = run.state
    return state.epoch >= run.config.epochs or state.stopped_early or _out_of_time(run)


def _out_of_time(run: Run) -> bool:
    """The wall-clock budget is spent, as worker 0's clock says (so all workers agree)."""
    if not run.config.max_minutes:
        return False
    over = torch.tensor(float(run.context.is_main and run.state.train_seconds > 60 * run.config.max_minutes),
                        device=run.device)
    return bool(run.context.all_reduce_sum(over) > 0)


# ------------------------------------------------------------------------------------------ finish

def finish(run: Run) -> dict[str, Any]:
    """Evaluate the best weights on train/valid/test, write plots and results.json (worker 0)."""
    config, data, device, context, out = run.config, run.data, run.device, run.context, run.out
    model = run.eval_model
    require_visible(out / "best.pt", context, device)
    load_weights(model, load_checkpoint(out / "best.pt", config)["model"], out / "best.pt")
    model.eval()
    kwargs = run.eval_kwargs() | {"progress": _bars(run)}
    state = run.state
    results: dict[str, Any] = {
        "dataset": config.dataset, "model": config.model.to_dict(), "parameters": count_parameters(model),
        "epochs_trained": state.epoch, "best_epoch": state.best_epoch, "stopped_early": state.stopped_early,
        "data": data.splits.describe(),
        "train_minutes": round(state.train_seconds / 60, 3), "workers": context.world_size,
        "skipped_updates": state.skipped_updates, "ema": config.ema,
        "objective": {"warmup_epochs": config.warmup_epochs, "free_bits": config.free_bits},
        "training_bound": {"objective": config.objective, "train_samples": config.train_samples,
                           "gradient": config.gradient},
        "train": evaluate(model, data.train_eval, desc="train -ELBO", **kwargs),
        "valid": evaluate(model, data.valid, desc="valid -ELBO", **kwargs),
        "test": evaluate(model, data.test, samples=config.eval_samples, desc=f"test -log p(x), K={config.eval_samples}",
                         compile=config.compile, **kwargs),
        "kl_note": "KL figures are single-sample Monte Carlo estimates of E_q[log q(z|x) - log p(z)]",
    }
    if context.is_main:
        results["diagnostics"] = posterior_diagnostics(model, data.test, batch_size=config.eval_batch_size,
                                                       device=device, seed=config.seed)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        save_image_grid(model.sample(64, generator), out / "samples.png", nrow=8)
        originals = data.test[:32].to(device)
        torch.manual_seed(config.seed)
        recon = model.reconstruct(originals)
        pairs = torch.stack([as_unit_interval(originals, recon.dtype), recon], 1).flatten(0, 1)  # original, recon, ...
        save_image_grid(pairs, out / "reconstructions.png", nrow=8)
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        logger.info("test -ELBO %.3f  -log p(x) %.3f (K=%d)", results["test"]["neg_elbo"], results["test"]["nll"],
                    config.eval_samples)
    context.barrier()
    return results
