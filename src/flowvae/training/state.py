"""A run in progress (:class:`Run`): what the loop's steps work on, whether it shows progress bars,
and when it is over."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from flowvae import distributed
from flowvae.config import TrainConfig
from flowvae.models import LatentVariableModel
from flowvae.progress import is_terminal
from flowvae.training.checkpoint import RunState
from flowvae.training.gradient_guard import GradientGuard
from flowvae.training.setup import PreparedData
from flowvae.training.tensorboard import TensorBoardLogger


@dataclass
class Run:
    """A run in progress: what :func:`~flowvae.training.train_epoch` and
    :func:`~flowvae.training.end_epoch` work on."""

    config: TrainConfig
    context: distributed.Context
    device: torch.device
    out: Path
    data: PreparedData
    model: LatentVariableModel
    step_model: torch.nn.Module  # the model as stepped: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generators: dict[str, torch.Generator]
    state: RunState
    ema: AveragedModel | None = None
    guard: GradientGuard | None = None  # built by start_run
    tensorboard: TensorBoardLogger | None = None  # on worker 0, with --tensorboard
    clock: Callable[[], float] = lambda: 0.0  # seconds of training so far, resumed runs included

    @property
    def eval_model(self) -> LatentVariableModel:
        """The weights evaluated: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the training set (the last batch may be smaller)."""
        return math.ceil(len(self.data.train) / self.config.batch_size)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def eval_kwargs(self) -> dict[str, Any]:
        return {
            "batch_size": self.config.eval_batch_size,
            "device": self.device,
            "seed": self.config.seed,
            "context": self.context,
            "precision": self.config.precision,
        }


def progress_bars(run: Run) -> bool:
    """Progress bars: asked for, worker 0, and a terminal to draw them on (else plain lines per epoch)."""
    return run.config.progress and run.context.is_main and is_terminal()


def _out_of_time(run: Run) -> bool:
    """The wall-clock budget is spent, as worker 0's clock says (so all workers agree)."""
    if not run.config.max_minutes:
        return False
    over = torch.tensor(
        float(run.context.is_main and run.state.train_seconds > 60 * run.config.max_minutes), device=run.device
    )
    return bool(run.context.all_reduce_sum(over) > 0)


def run_is_over(run: Run) -> bool:
    """All epochs done, stopped early, or the time budget spent."""
    state = run.state
    return state.epoch >= run.config.epochs or state.stopped_early or _out_of_time(run)
