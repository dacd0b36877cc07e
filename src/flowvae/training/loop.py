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

Here: :func:`train`, :func:`start_run` and :func:`finish`; one epoch and its end are in
:mod:`flowvae.training.epoch`, and each step's details in the modules that
:mod:`flowvae.training` lists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from flowvae import distributed
from flowvae.config import ConfigError, TrainConfig
from flowvae.data import DatasetSplits
from flowvae.evaluation import evaluate, posterior_diagnostics
from flowvae.io import atomic_write_text, remove_stale_temporaries
from flowvae.models import LatentVariableModel, as_unit_interval, build_model, count_parameters
from flowvae.optimizers import build_optimizer
from flowvae.training.checkpoint import RunState, check_resumable, load_checkpoint, load_weights, resume_from
from flowvae.training.epoch import end_epoch, train_epoch
from flowvae.training.gradient_guard import GradientGuard
from flowvae.training.outputs import repair_best, write_results
from flowvae.training.run_dir import (
    clear_interrupted_start,
    interrupted_start,
    prepare_out_dir,
    remove_failed_start,
    require_shared_out,
    require_visible,
    run_lock,
)
from flowvae.training.setup import (
    build_ema,
    build_generators,
    configure_backends,
    prepare_data,
    resolve_device,
    stepped_model,
)
from flowvae.training.state import Run, progress_bars, run_is_over
from flowvae.training.tensorboard import TensorBoardLogger, check_log_dir

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- start or resume a run


def start_run(
    config: TrainConfig,
    resume: bool,
    context: distributed.Context,
    device: torch.device,
    splits: DatasetSplits | None = None,
    model: LatentVariableModel | None = None,
) -> Run:
    """Build the data, model and optimizer (or take ``splits`` and ``model`` given to :func:`train`);
    on ``resume`` restore them from ``checkpoint.pt``."""
    out = Path(config.out)
    # The numerics switches, the data and the model.
    configure_backends(config, device)
    torch.manual_seed(config.seed)
    data = prepare_data(config, splits)
    if device.type == "cuda":  # the training set lives on the GPU: no host gather or copy per step
        data = dataclasses.replace(data, train=data.train.to(device))
    if model is None:
        model = build_model(config.model, data.splits.image_shape, data.splits.kind)
    model = model.to(device)
    if config.gradient != "reparam" and model.path_gradient_problem():
        raise ConfigError(
            f"--gradient {config.gradient} is not implemented for {model.path_gradient_problem()} "
            "(only for a diagonal Gaussian posterior without a flow); use --gradient reparam"
        )
    # The optimizer, the fp16 loss scaler and the random generators.
    optimizer = build_optimizer(config, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    generators = build_generators(config, device)
    # Resume from checkpoint.pt, or initialise a new run.
    state = RunState()
    if resume:
        require_visible(out / "checkpoint.pt", context, device)
        state, ckpt = resume_from(out / "checkpoint.pt", config, model, optimizer, generators, device)
    else:  # data-dependent initialisation (weight normalization; a no-op for most models)
        with torch.no_grad():
            model.initialise(data.train[: config.batch_size].to(device))
    if config.output_bias_init and not resume:
        model.init_output_bias(as_unit_interval(data.train, torch.float64).mean(0).to(device))
    # The weights' moving average, the model as stepped and the gradient guard.
    ema = build_ema(config, model)
    if ema is not None and resume and ckpt.get("ema") is not None:
        load_weights(ema, ckpt["ema"], out / "checkpoint.pt")
    elif ema is not None and resume:  # --ema switched on now: the average starts from the resumed weights
        logger.warning(
            "the run was trained without --ema: its moving average starts from the weights of epoch %d", state.epoch
        )
    step_model = stepped_model(model, config, context, device)
    guard = GradientGuard(
        model,
        optimizer,
        scaler,
        max_norm=config.grad_clip,
        skip_factor=config.grad_skip,
        device=device,
        ema=ema,
        ema_decay=config.ema,
    )
    guard.load(state.log_grad_norm_level, state.skipped_updates, state.consecutive_skips)
    return Run(config, context, device, out, data, model, step_model, optimizer, scaler, generators, state, ema, guard)


# ------------------------------------------------------------------------------------------ finish


def finish(run: Run) -> dict[str, Any]:
    """Evaluate the best weights on train/valid/test, write plots and results.json (worker 0)."""
    config, data, device, context, out = run.config, run.data, run.device, run.context, run.out
    model = run.eval_model
    require_visible(out / "best.pt", context, device)
    load_weights(model, load_checkpoint(out / "best.pt", config)["model"], out / "best.pt")
    model.eval()
    kwargs = run.eval_kwargs() | {"progress": progress_bars(run)}
    state = run.state
    results: dict[str, Any] = {
        "dataset": config.dataset,
        "model": config.model.to_dict(),
        "parameters": count_parameters(model),
        "epochs_trained": state.epoch,
        "best_epoch": state.best_epoch,
        "stopped_early": state.stopped_early,
        "data": data.splits.describe(),
        "train_minutes": round(state.train_seconds / 60, 3),
        "workers": context.world_size,
        "skipped_updates": state.skipped_updates,
        "ema": config.ema,
        "objective": {"warmup_epochs": config.warmup_epochs, "free_bits": config.free_bits},
        "training_bound": {
            "objective": config.objective,
            "train_samples": config.train_samples,
            "gradient": config.gradient,
        },
        "train": evaluate(model, data.train_eval, desc="train -ELBO", **kwargs),
        "valid": evaluate(model, data.valid, desc="valid -ELBO", **kwargs),
        "test": evaluate(
            model,
            data.test,
            samples=config.eval_samples,
            desc=f"test -log p(x), K={config.eval_samples}",
            compile=config.compile,
            **kwargs,
        ),
        "kl_note": "KL figures are single-sample Monte Carlo estimates of E_q[log q(z|x) - log p(z)]",
    }
    if context.is_main:
        results["diagnostics"] = posterior_diagnostics(
            model, data.test, batch_size=config.eval_batch_size, device=device, seed=config.seed
        )
        write_results(run, model, results)
        logger.info(
            "test -ELBO %.3f  -log p(x) %.3f (K=%d)",
            results["test"]["neg_elbo"],
            results["test"]["nll"],
            config.eval_samples,
        )
    context.barrier()
    return results


# ------------------------------------------------------------------------------------------- train


def _begin_run(run: Run, resume: bool, notices: Sequence[str]) -> None:
    """Every check has passed: only now does worker 0 change the run's directory (debris of an
    interrupted start, TensorBoard, temporaries, config.yaml, best.pt); the run's clock starts."""
    config, context, out = run.config, run.context, run.out
    tf32 = (
        [f"--tf32 has no effect on {run.device.type}; it acts only on CUDA devices"]
        if config.tf32 and run.device.type != "cuda"
        else []
    )
    for message in [*notices, *tf32] if context.is_main else []:
        logger.warning("warning: %s", message)
    if context.is_main and not resume:
        clear_interrupted_start(out)
    if context.is_main and config.tensorboard:
        run.tensorboard = TensorBoardLogger(out, resume_step=run.state.step + 1 if resume else None)
    if context.is_main:
        for path in remove_stale_temporaries(out):
            logger.info("removed %s, left by an interrupted write", path)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        if resume:
            repair_best(run)
    logger.info(
        "%s: %d parameters, %s, %d workers, %d training images",
        config.dataset,
        count_parameters(run.model),
        run.device,
        context.world_size,
        len(run.data.train),
    )
    started = time.perf_counter() - run.state.train_seconds
    run.clock = lambda: time.perf_counter() - started


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    splits: DatasetSplits | None = None,
    model: LatentVariableModel | None = None,
    notices: Sequence[str] = (),
) -> dict[str, Any]:
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
        # Checks before any work: the run directory, TensorBoard, a checkpoint to resume.
        device = resolve_device(device_name)
        if resume and not (out / "checkpoint.pt").exists() and interrupted_start(out):
            logger.warning(
                "%s holds no checkpoint, only the files of a start interrupted before its first "
                "checkpoint: starting the run afresh",
                out,
            )
            resume = False
        if context.is_main:
            created = prepare_out_dir(out, resume)
            if config.tensorboard:
                check_log_dir(out)
        require_shared_out(out, context, device)  # before any work: not at the end of training
        if resume:  # refuse another run's options before loading any data
            check_resumable(out / "checkpoint.pt", config)
        context.barrier()

        def undo_failed_start() -> None:  # run by run_lock on an error, still holding the lock
            if not resume and not (out / "checkpoint.pt").exists():
                remove_failed_start(out, created, ours=True)  # a new run that failed leaves nothing

        # The loop of the module's docstring, under the run directory's lock.
        with run_lock(out, on_error=undo_failed_start) if context.is_main else contextlib.nullcontext():
            run = start_run(config, resume, context, device, splits, model)
            _begin_run(run, resume, notices)
            epochs = tqdm(
                total=config.epochs,
                initial=min(run.state.epoch, config.epochs),
                desc=f"epochs (then the test -log p(x) with K={config.eval_samples})",
                disable=not progress_bars(run),
            )
            while not run_is_over(run):
                stats = train_epoch(run)
                end_epoch(run, stats)
                epochs.update(1)
                epochs.set_postfix(
                    loss=f"{stats['train_loss']:.2f}", valid=f"{run.state.history[-1]['valid_neg_elbo']:.2f}"
                )
            epochs.close()
            if run.tensorboard is not None:
                run.tensorboard.close()
            context.barrier()
            return finish(run)
    except BaseException:
        if context.is_main and created is not None and not (out / "checkpoint.pt").exists():
            remove_failed_start(out, created, ours=False)  # e.g. the lock could not be taken: empty dirs only
        raise
    finally:
        distributed.teardown()
