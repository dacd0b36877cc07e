"""Learning-rate schedules that know the run's budget: decay from ``lr`` to a floor over the
optimizer steps that the run will take, so that a run stopped by ``--epochs`` or by
``--max-minutes`` ends at the floor instead of mid-schedule.

    progress p = step / total_steps ∈ [0, 1]
    cosine:       lr(p) = floor + (lr − floor) · (1 + cos π p) / 2
    exponential:  lr(p) = lr · (floor / lr)^p

``total_steps`` is epochs × steps per epoch, or, under a wall-clock budget, the smaller of that and
the steps the budget allows at the run's measured rate (:func:`budget_steps`, re-estimated after
every epoch).
"""

from __future__ import annotations

import math


def scheduled_lr(schedule: str, lr: float, floor: float, step: int, total_steps: float) -> float:
    """The learning rate of the ``step``-th update (1-based) of ``total_steps``: the last one is at the floor
    (``schedule``: cosine | exponential)."""
    p = min(max(step / max(total_steps, 1.0), 0.0), 1.0)
    if schedule == "cosine":
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "exponential":
        return lr * (floor / lr) ** p
    raise ValueError(f"lr schedule must be cosine or exponential, got {schedule!r}")


def budget_steps(steps: int, seconds: float, max_minutes: float | None, epoch_steps: float) -> float:
    """Total steps of a run: ``epoch_steps`` (epochs × steps per epoch), capped by the steps that
    ``max_minutes`` allows at the rate so far (``steps`` in ``seconds``)."""
    if not max_minutes or steps <= 0 or seconds <= 0:
        return epoch_steps
    return min(epoch_steps, steps * 60.0 * max_minutes / seconds)
