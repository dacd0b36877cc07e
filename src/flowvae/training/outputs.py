"""What a run writes in its directory (worker 0 only, each file atomically).

Every epoch: ``checkpoint.pt``, then ``best.pt`` when the validation -ELBO improved, the metrics
(``metrics.jsonl``/``.csv``), ``curves.png`` and, with ``--tensorboard``, the epoch's scalars and
now and then sample and reconstruction grids.  At the end: ``samples.png``,
``reconstructions.png`` and ``results.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from flowvae.io import atomic_torch_save, atomic_write_text
from flowvae.models import LatentVariableModel, as_unit_interval
from flowvae.plots import save_image_grid
from flowvae.report import plot_curves
from flowvae.training.checkpoint import best_dict, checkpoint_dict, model_class, saved_epoch
from flowvae.training.state import Run

logger = logging.getLogger(__name__)

IMAGES_EVERY_EPOCHS = 5  # TensorBoard's sample and reconstruction grids: epochs 1, 6, 11, ...


def sample_images(
    model: LatentVariableModel,
    originals: torch.Tensor,
    seed: int,
    device: torch.device,
    *,
    reconstruction_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """64 samples drawn with a generator seeded ``seed``, and ``originals`` interleaved with their
    reconstructions (original, reconstruction, ...); ``reconstruction_seed`` reseeds torch's global
    generator first, so the reconstructions' posterior draws are the same every time."""
    generator = torch.Generator(device).manual_seed(seed)
    samples = model.sample(64, generator)
    originals = originals.to(device)
    if reconstruction_seed is not None:
        torch.manual_seed(reconstruction_seed)
    recon = model.reconstruct(originals)
    pairs = torch.stack([as_unit_interval(originals, recon.dtype), recon], 1).flatten(0, 1)
    return samples, pairs


def run_data_description(run: Run) -> dict[str, Any]:
    """The data's name, kind, image shape and split sizes, and the model's class: what a checkpoint
    records so that inference needs no data files."""
    return run.data.splits.describe() | {"model_class": model_class(run.model)}


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl and metrics.csv: one row per epoch."""
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    if history:
        buffer = io.StringIO()
        names = list(dict.fromkeys(k for row in history for k in row))
        writer = csv.DictWriter(buffer, fieldnames=names)
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(out / "metrics.csv", buffer.getvalue())


def _write_best(run: Run) -> None:
    atomic_torch_save(
        best_dict(run.eval_model, run.config, run.state.epoch, run_data_description(run)), run.out / "best.pt"
    )


def _log_epoch_to_tensorboard(run: Run) -> None:
    row, step = run.state.history[-1], run.state.step
    run.tensorboard.scalars(
        step,
        {f"valid/{k.removeprefix('valid_')}": v for k, v in row.items() if k.startswith("valid_")}
        | {"epoch/lr": row["lr"], "epoch/skipped_updates": row["skipped_updates"]},
    )
    if row["epoch"] % IMAGES_EVERY_EPOCHS == 1 or IMAGES_EVERY_EPOCHS == 1:
        samples, pairs = sample_images(run.eval_model, run.data.valid[:32], run.config.seed, run.device)
        run.tensorboard.images("samples", samples, step)
        run.tensorboard.images("reconstructions", pairs, step)
    run.tensorboard.flush()


def write_epoch(run: Run, improved: bool) -> None:
    """Worker 0: checkpoint.pt, then best.pt (if improved), metrics.jsonl/.csv — each written atomically.

    checkpoint.pt comes first, so best.pt is never ahead of it: should best.pt's write fail (a full
    disk), the checkpoint holds the same weights and :func:`repair_best` rewrites it on resume.
    Both record the data's description, so that inference needs no data files."""
    data = run_data_description(run)
    atomic_torch_save(
        checkpoint_dict(
            model=run.model,
            optimizer=run.optimizer,
            data=data,
            ema=run.ema,
            config=run.config,
            state=run.state,
            generators=run.generators,
            device=run.device,
        ),
        run.checkpoint_path,
    )
    if improved:
        _write_best(run)
    write_history(run.out, run.state.history)
    plot_curves(run.state.history, run.out / "curves.png", title=f"{run.config.dataset}, {run.config.model.arch}")
    if run.tensorboard is not None:
        _log_epoch_to_tensorboard(run)


def repair_best(run: Run) -> None:
    """On resume: a best.pt behind the checkpoint's best epoch (its write failed after the checkpoint's)
    is rewritten from the checkpoint, whose evaluation weights are then the best ones; the metrics
    files are rewritten from the checkpoint's history."""
    state, path = run.state, run.out / "best.pt"
    if state.best_epoch == state.epoch > 0:
        saved = saved_epoch(path)  # None when missing, truncated or foreign: rewritten below
        if saved != state.best_epoch:
            logger.warning(
                "%s was behind %s (epoch %s, best %d): rewritten from the checkpoint",
                path,
                run.checkpoint_path,
                saved,
                state.best_epoch,
            )
            _write_best(run)
    write_history(run.out, state.history)


def write_results(run: Run, model: LatentVariableModel, results: dict[str, Any]) -> None:
    """samples.png and reconstructions.png of ``model`` (test images), then results.json."""
    samples, pairs = sample_images(
        model, run.data.test[:32], run.config.seed, run.device, reconstruction_seed=run.config.seed
    )
    save_image_grid(samples, run.out / "samples.png", nrow=8)
    save_image_grid(pairs, run.out / "reconstructions.png", nrow=8)
    atomic_write_text(run.out / "results.json", json.dumps(results, indent=2))
