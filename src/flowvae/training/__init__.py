"""Train any flowvae model: :func:`train` runs the loop of :mod:`flowvae.training.loop`.

    run = start_run(config, resume)          # build or resume: data, model, optimizer, RNG, state
    while not run_is_over(run):
        stats = train_epoch(run)             # one pass over the training set
        end_epoch(run, stats)                # validate, early stopping, lr decay, write files
    results = finish(run)                    # evaluate the best weights, write results.json

The modules, each importing only those listed above it:

    tensorboard      TensorBoard event files (an optional dependency)
    gradient_guard   skip an update whose gradient is non-finite or a spike, without a host sync
    checkpoint       the checkpoint dict: format, loading, run state, RNG states, the resume policy
    setup            device and backends, data, generators, EMA, the model as stepped
    run_dir          the run directory: checks before a start, lock, clean-up, seen by every worker
    state            the run in progress (Run), its progress bars, and when it is over
    safeguards       stop a run that has diverged
    outputs          the files a run writes every epoch and at the end
    epoch            one epoch of training, and the end of an epoch
    loop             train: start or resume, the loop, finish
"""

from flowvae.training.checkpoint import (
    CHECKPOINT_FORMAT,
    MUST_MATCH_ON_RESUME,
    READABLE_FORMATS,
    CheckpointError,
    RunState,
    load_checkpoint,
    load_weights,
    model_class,
    resume_differences,
)
from flowvae.training.epoch import end_epoch, train_epoch
from flowvae.training.gradient_guard import GradientGuard
from flowvae.training.loop import finish, start_run, train
from flowvae.training.outputs import run_data_description, write_epoch
from flowvae.training.run_dir import RunDirError, interrupted_start, require_shared_out, require_visible, run_lock
from flowvae.training.setup import PreparedData, configure_backends, load_splits, prepare_data, resolve_device
from flowvae.training.state import Run, run_is_over
from flowvae.training.tensorboard import TensorBoardLogger, TensorBoardUnavailable

__all__ = [
    "CHECKPOINT_FORMAT",
    "MUST_MATCH_ON_RESUME",
    "READABLE_FORMATS",
    "CheckpointError",
    "GradientGuard",
    "PreparedData",
    "Run",
    "RunDirError",
    "RunState",
    "TensorBoardLogger",
    "TensorBoardUnavailable",
    "configure_backends",
    "end_epoch",
    "finish",
    "interrupted_start",
    "load_checkpoint",
    "load_splits",
    "load_weights",
    "model_class",
    "prepare_data",
    "require_shared_out",
    "require_visible",
    "resolve_device",
    "resume_differences",
    "run_data_description",
    "run_is_over",
    "run_lock",
    "start_run",
    "train",
    "train_epoch",
    "write_epoch",
]
