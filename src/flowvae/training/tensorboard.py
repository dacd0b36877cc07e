"""TensorBoard event files for a run: ``RUN/tensorboard/``, continued without duplicates on resume.

An optional dependency: ``pip install "flowvae[tensorboard]"``.  Intended use in the trainer
(only worker 0 writes; ``step`` is the optimizer-update count, the same number in every stream)::

    logger = TensorBoardLogger(config.out, resume_step=state["step"] + 1 if resume else None)
    ...                                                    # after each update:
    logger.scalars(state["step"], {"train/loss": loss, "train/beta": beta, "train/lr": lr,
                                   "train/skipped_updates": skipped})
    ...                                                    # after each epoch's validation:
    logger.scalars(state["step"], {"valid/neg_elbo": ..., "valid/reconstruction": ..., "valid/kl": ...,
                                   **{f"valid/kl_group{i}": kl for i, kl in enumerate(group_kls)}})
    logger.figure("valid/curves", fig, state["step"])       # any matplotlib figure
    if epoch % 5 == 0:
        logger.images("samples", model.sample(64), state["step"])
    logger.close()

then ``tensorboard --logdir RUN/tensorboard`` (or ``--logdir runs/`` for every run at once).

On resume, pass the first step that the resumed run will write: events that a killed run wrote at
or after it (after its last checkpoint) are purged (``SummaryWriter(purge_step=...)``), so each step
appears once in TensorBoard, with the values of the run that went on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flowvae.config import ConfigError
from flowvae.io import probe_writable

INSTALL_HINT = 'pip install "flowvae[tensorboard]"'


class TensorBoardUnavailable(ImportError, ConfigError):
    """TensorBoard logging was asked for but the tensorboard package is not installed.

    An ImportError, and a ConfigError so that the ``flowvae`` command prints it as one line.
    """


def check_log_dir(out_dir: str | Path) -> None:
    """Before a run changes anything: the tensorboard package is there, and ``out_dir/tensorboard`` is
    absent or a real, writable directory (not a link that would put the events elsewhere)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise TensorBoardUnavailable(f"TensorBoard logging needs the tensorboard package: {INSTALL_HINT}") from None
    log_dir = Path(out_dir) / "tensorboard"
    if log_dir.is_symlink():
        raise ConfigError(
            f"{log_dir} is a symbolic link; flowvae writes TensorBoard events only into the run "
            "itself (remove the link)"
        )
    if log_dir.exists() and not log_dir.is_dir():
        raise ConfigError(f"{log_dir} exists and is not a directory; --tensorboard writes its events there")
    if log_dir.is_dir():
        try:
            probe_writable(log_dir)
        except OSError as err:
            raise ConfigError(
                f"{log_dir} cannot be written ({err.strerror}); --tensorboard writes its events there"
            ) from None


class TensorBoardLogger:
    """Scalars, image grids and figures of a run, written to ``out_dir/tensorboard/``.

    Args:
        out_dir: the run directory.
        resume_step: the first step a resumed run will log; events at this step or later from
            the interrupted run are purged.  None for a fresh run.
    """

    def __init__(self, out_dir: str | Path, resume_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TensorBoardUnavailable(f"TensorBoard logging needs the tensorboard package: {INSTALL_HINT}") from None
        self.log_dir = Path(out_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=resume_step)

    def scalars(self, step: int, values: Mapping[str, float | torch.Tensor]) -> None:
        """One scalar per tag (e.g. ``{"train/loss": 93.1, "train/lr": 1e-3}``) at ``step``."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), global_step=step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """A batch of images (N, C, H, W) with values in [0, 1], shown as one grid."""
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        self.writer.add_images(tag, images.detach().float().clamp(0, 1).cpu(), global_step=step, dataformats="NCHW")

    def figure(self, tag: str, figure: Any, step: int) -> None:
        """A matplotlib figure, rendered to an image (the figure is closed)."""
        self.writer.add_figure(tag, figure, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
