"""The gradient guard: skip an update whose gradient is non-finite or a spike, without a host sync.

Each step the guard computes ‖g‖ (after unscaling under fp16, clipped if asked), decides on the
device whether the update is made, and keeps its running level of log ‖g‖ and its skip counters
on the device too.  The decision reaches the optimizer as a tensor: fused Adam takes it as its
``found_inf`` flag (a skipped step leaves parameters, moments and step count unchanged), and the
EMA of the weights moves by a weight of 0 on a skipped step.  Only optimizers without a fused
kernel (Adamax) read the flag on the host, once per step.

The counters reach the host when :meth:`GradientGuard.sync` is called: the trainer does so every
few dozen steps and at the end of each epoch, and stops there after :data:`MAX_CONSECUTIVE_SKIPS`
skips in a row (no update is made from a bad gradient in between, so no weights are lost).
"""

from __future__ import annotations

import math

import torch

WARMUP_STEPS = 50              # the guard learns the norm's level before it skips spikes
DECAY = 0.99                   # running level of log ‖g‖: an EMA over every finite norm
MAX_CONSECUTIVE_SKIPS = 200    # that many skipped updates in a row: training has diverged


class GradientGuard:
    """Backpropagate, clip and step ``optimizer`` unless ‖g‖ is non-finite or above ``skip_factor``
    times its running level (``skip_factor`` 0: skip non-finite ones only).

    The level is an EMA of log ‖g‖ over every finite norm, skipped ones included, so a lasting change
    of scale is absorbed within a few hundred steps and the guard never stalls training for good (a
    fixed threshold can: openai/vdvae issue 25).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                 max_norm: float, skip_factor: float, device: torch.device,
                 ema: torch.optim.swa_utils.AveragedModel | None = None, ema_decay: float = 0.0):
        self.parameters, self.optimizer, self.scaler = list(model.parameters()), optimizer, scaler
        self.max_norm = max_norm if max_norm > 0 else math.inf
        self.log_skip_factor = math.log(skip_factor) if skip_factor > 0 else math.inf
        self.fused = all(group.get("fused") for group in optimizer.param_groups)
        self.ema, self.ema_weight = ema, 1.0 - ema_decay
        if ema is not None:  # the EMA's copy of every floating-point parameter and buffer, and the live one
            pairs = zip([*ema.module.parameters(), *ema.module.buffers()], [*model.parameters(), *model.buffers()])
            pairs = [(a, m) for a, m in pairs if a.is_floating_point()]
            self.ema_averaged, self.ema_live = [a for a, _ in pairs], [m for _, m in pairs]
            self.ema_dtypes = sorted({a.dtype for a in self.ema_averaged}, key=str)
        self.level = torch.full((), math.nan, dtype=torch.float64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)

    def load(self, level: float | None, skipped: int, consecutive: int) -> None:
        """Continue from counters saved in a checkpoint (``level`` None: none learnt yet)."""
        self.level.fill_(math.nan if level is None else level)
        self.skipped.fill_(skipped)
        self.consecutive.fill_(consecutive)

    def sync(self) -> tuple[float | None, int, int]:
        """The counters on the host (one sync): (level of log ‖g‖ or None, skipped updates, skips in a row)."""
        level, skipped, consecutive = self.level.item(), int(self.skipped.item()), int(self.consecutive.item())
        return (None if math.isnan(level) else level), skipped, consecutive

    def step(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Backpropagate ``loss`` and update if the gradient is sane; returns that decision as a
        0-dim bool tensor on the device (reading it syncs).  ``step``: updates so far, for the warm-up."""
        optimizer, scaler = self.optimizer, self.scaler
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_norm).to(self.level.dtype)
        finite = torch.isfinite(norm)
        log_norm = torch.log(norm.clamp(min=1e-30))
        learnt = ~torch.isnan(self.level)
        made = finite
        if step >= WARMUP_STEPS:
            made = made & ~(learnt & (log_norm > self.level + self.log_skip_factor))  # not a spike
        moved = torch.where(learnt, DECAY * self.level + (1 - DECAY) * log_norm, log_norm)
        self.level.copy_(torch.where(finite, moved, self.level))
        skipped = (~made).long()
        self.skipped.add_(skipped)
        self.consecutive.mul_(skipped).add_(skipped)
        if self.fused:
            optimizer.found_inf = skipped.float()  # read by the fused kernel: no update, no step count
            optimizer.step()
            del optimizer.found_inf
        elif made.item():                          # no fused kernel for this optimizer: one host sync
            optimizer.step()
        scaler.update()                            # fp16: lowers the scale after an overflow
        if self.ema is not None:  # averaged += w·(live − averaged), w = 0 on a skipped step
            weights = {dtype: made.to(dtype) * self.ema_weight for dtype in self.ema_dtypes}
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_averaged, self.ema_live, [weights[a.dtype] for a in self.ema_averaged])
            self.ema.n_averaged.add_(made.long().to(self.ema.n_averaged.device))
        return made

