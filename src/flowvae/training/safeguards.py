"""Stop a run that has diverged, with a message that says where its last good weights are.

Two checks: the gradient guard (:mod:`flowvae.training.gradient_guard`) skips every update whose
gradient is non-finite or a spike, and the run stops after
:data:`~flowvae.training.gradient_guard.MAX_CONSECUTIVE_SKIPS` skips in a row; and the validation
-ELBO may not stay far above its best, or beyond any sane value, for :data:`DIVERGED_EPOCHS` epochs.
"""

from __future__ import annotations

import math

import torch

from flowvae.training.gradient_guard import MAX_CONSECUTIVE_SKIPS
from flowvae.training.state import Run, run_is_over

GUARD_SYNC_STEPS = 50  # the gradient guard's counters reach the host this often, and per epoch
DIVERGED_EPOCHS = 3  # validation -ELBO far above its best for this many epochs: diverged
ADVICE = "Lower --lr or set --grad-clip"  # the last words of every divergence message


def sane_limit(run: Run) -> float:
    """The largest sane -ELBO in the model's own nats: 10x that of a model that puts equal mass on
    every pixel value (D·log 2 for binary data, D·log 256 for 8-bit), less the likelihood's
    dequantization offset.  Only a divergence gets beyond it: an untrained model is near 1x."""
    splits = run.data.splits
    limit = 10 * splits.dim * math.log(256 if splits.kind == "8bit" else 2)
    return limit - run.model.likelihood.discrete_nats_offset(splits.dim)


def is_sane(run: Run, neg_elbo: float) -> bool:
    """A finite -ELBO within :func:`sane_limit`."""
    return math.isfinite(neg_elbo) and neg_elbo <= sane_limit(run)


def last_good(run: Run) -> str:
    """Where the run's last good weights are, for a divergence's message."""
    if not is_sane(run, run.state.best_valid) and run.state.epoch > 0:
        return "no good weights were saved"
    for name in ("best.pt", "checkpoint.pt"):
        if (run.out / name).is_file():
            return f"the last good weights are in {run.out / name}"
    return "no checkpoint was written yet"


def sync_guard(run: Run) -> None:
    """Copy the guard's counters into the run's state (one host sync); stop a run whose updates
    have all been skipped for ``MAX_CONSECUTIVE_SKIPS`` steps."""
    state = run.state
    state.log_grad_norm_level, state.skipped_updates, state.consecutive_skips = run.guard.sync()
    if state.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
        raise FloatingPointError(
            f"training diverged: {state.consecutive_skips} updates in a row had a non-finite "
            f"or exploding gradient (step {state.step}); {last_good(run)}. {ADVICE}"
        )


def guarded_step(run: Run, loss: torch.Tensor) -> torch.Tensor:
    """Backpropagate and update unless the gradient is non-finite or a spike (see
    :mod:`flowvae.training.gradient_guard`); returns that decision as a device tensor.  The guard's
    counters reach the host every :data:`GUARD_SYNC_STEPS` steps, where a diverged run stops."""
    made = run.guard.step(loss, run.state.step)
    if (run.state.step + 1) % GUARD_SYNC_STEPS == 0:
        sync_guard(run)
    return made


def check_divergence(run: Run, valid_neg_elbo: float) -> None:
    """Stop with a clear message when the validation -ELBO stays far above its best, or beyond any
    sane value (:func:`sane_limit`), for DIVERGED_EPOCHS epochs, or when the run ends with no sane
    weights at all."""
    state, splits = run.state, run.data.splits

    def insane(value: float) -> bool:
        return not is_sane(run, value)

    far_above = insane(valid_neg_elbo) or (
        math.isfinite(state.best_valid) and valid_neg_elbo > state.best_valid + max(10.0, 0.5 * abs(state.best_valid))
    )
    state.diverging_epochs = state.diverging_epochs + 1 if far_above else 0
    sane = f"{sane_limit(run):.4g} nats (10x that of equal mass on every value of the {splits.dim} pixels)"
    if state.diverging_epochs >= DIVERGED_EPOCHS:
        where = (
            f"beyond {sane}"
            if insane(valid_neg_elbo)
            else f"against its best {state.best_valid:.4g} (epoch {state.best_epoch})"
        )
        raise FloatingPointError(
            f"training diverged: valid -ELBO {valid_neg_elbo:.4g} for {state.diverging_epochs} "
            f"epochs, {where}; {last_good(run)}. {ADVICE}"
        )
    if insane(state.best_valid) and run_is_over(run):
        raise FloatingPointError(
            f"training diverged: the run ends with a best valid -ELBO of {state.best_valid:.4g}, "
            f"beyond {sane}; {last_good(run)}. {ADVICE}"
        )
