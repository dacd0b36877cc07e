"""The gradient guard: skip an update whose gradient is non-finite or a spike, without a host sync.

Each step the guard computes ‖g‖ (after unscaling under fp16, clipped if asked), decides on the
device whether the update is made, and keeps its running level of log ‖g‖ and its skip counters
on the device too.  The decision reaches the optimizer as a tensor: fused Adam takes it as its
``found_inf`` flag (a skipped step leaves parameters, moments and step count unchanged), Adamax
(which has no fused kernel) is stepped by :func:`masked_adamax_step` with the flag as a 0/1 weight,
and the EMA of the weights moves by a weight of 0 on a skipped step.  Only other optimizers read
the flag on the host, once per step.

The counters reach the host when :meth:`GradientGuard.sync` is called: the trainer does so every
few dozen steps and at the end of each epoch, and stops there after :data:`MAX_CONSECUTIVE_SKIPS`
skips in a row (no update is made from a bad gradient in between, so no weights are lost).
"""

from __future__ import annotations

import math

import torch

WARMUP_STEPS = 50  # the guard learns the norm's level before it skips spikes
DECAY = 0.99  # running level of log ‖g‖: an EMA over every finite norm
MAX_CONSECUTIVE_SKIPS = 200  # that many skipped updates in a row: training has diverged


@torch.no_grad()
def masked_adamax_step(optimizer: torch.optim.Adamax, made: torch.Tensor) -> None:
    """torch.optim.Adamax's update (Kingma & Ba 2015, Alg. 2) weighted by ``made`` (0-dim bool on the
    device), without reading it on the host: a skipped step (``made`` False, the gradient maybe
    non-finite) leaves parameters, moments and step counts unchanged.  State as Adamax keeps it.

        m ← m + w(1−β₁)(g − m),  u ← w·max(β₂u, |g| + ε) + (1 − w)·u,  t ← t + w,
        θ ← θ − w · lr/(1 − β₁ᵗ) · m/u,    w = made ∈ {0, 1}

    With a group's ``decoupled_weight_decay`` λ (:class:`flowvae.optimizers.AdamaxW`), θ ← θ·(1 − w·lr·λ) first.
    """
    w = made.to(torch.float32)
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        (beta1, beta2), eps, lr = group["betas"], group["eps"], group["lr"]
        for p in params:
            state = optimizer.state[p]
            if not state:
                state.update(
                    step=torch.zeros((), device=p.device), exp_avg=torch.zeros_like(p), exp_inf=torch.zeros_like(p)
                )
            elif state["step"].device != p.device:  # Adamax keeps it on the CPU: moved once, after loading
                state["step"] = state["step"].to(p.device)
        decay = group.get("decoupled_weight_decay", 0.0)  # flowvae.optimizers.AdamaxW: w ← w·(1 − lr·λ) first
        if decay:
            torch._foreach_mul_(params, 1 - w * (lr * decay))
        states = [optimizer.state[p] for p in params]
        exp_avgs, exp_infs, steps = ([s[k] for s in states] for k in ("exp_avg", "exp_inf", "step"))
        grads = [torch.where(made, p.grad, 0.0) for p in params]  # a skipped gradient may be inf or NaN
        if group["maximize"]:
            torch._foreach_neg_(grads)
        if group["weight_decay"]:
            torch._foreach_add_(grads, params, alpha=group["weight_decay"])
        # Products with a 0-dim device tensor (one fused kernel on CUDA; a list of 0-dim weights would
        # take one kernel per tensor); sums with lists (a single-tensor operand is read on the host on a CPU).
        moves = torch._foreach_sub(grads, exp_avgs)
        torch._foreach_mul_(moves, w * (1 - beta1))
        torch._foreach_add_(exp_avgs, moves)
        torch._foreach_abs_(grads)
        torch._foreach_add_(grads, eps)
        torch._foreach_maximum_(grads, torch._foreach_mul(exp_infs, beta2))
        torch._foreach_mul_(grads, w)  # u ← w·new + (1 − w)·u: exact for w in {0, 1}
        torch._foreach_mul_(exp_infs, 1 - w)
        torch._foreach_add_(exp_infs, grads)
        torch._foreach_add_(steps, [w] * len(params))
        # A skipped first step leaves t = 0 and u = 0: with t + 1 − w and u + 1 − w its 0-weighted update stays finite.
        keep = [1 - w] * len(params)
        corrections = torch._foreach_pow(beta1, torch._foreach_add(steps, keep))
        torch._foreach_neg_(corrections)
        torch._foreach_add_(corrections, 1.0)  # 1 − β₁ᵗ
        updates = torch._foreach_div(exp_avgs, torch._foreach_add(exp_infs, keep))
        torch._foreach_mul_(updates, torch._foreach_div([lr * w] * len(params), corrections))
        torch._foreach_sub_(params, updates)


class GradientGuard:
    """Backpropagate, clip and step ``optimizer`` unless ‖g‖ is non-finite or above ``skip_factor``
    times its running level (``skip_factor`` 0: skip non-finite ones only).

    The level is an EMA of log ‖g‖ over every finite norm, skipped ones included, so a lasting change
    of scale is absorbed within a few hundred steps and the guard never stalls training for good (a
    fixed threshold can: openai/vdvae issue 25).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        *,
        max_norm: float,
        skip_factor: float,
        device: torch.device,
        ema: torch.optim.swa_utils.AveragedModel | None = None,
        ema_decay: float = 0.0,
    ) -> None:
        self.parameters, self.optimizer, self.scaler = list(model.parameters()), optimizer, scaler
        self.max_norm = max_norm if max_norm > 0 else math.inf
        self.log_skip_factor = math.log(skip_factor) if skip_factor > 0 else math.inf
        self.fused = all(group.get("fused") for group in optimizer.param_groups)
        self.masked_adamax = isinstance(optimizer, torch.optim.Adamax)
        self.ema, self.ema_weight = ema, 1.0 - ema_decay
        if ema is not None:  # the EMA's copy of every floating-point parameter and buffer, and the live one
            pairs = zip([*ema.module.parameters(), *ema.module.buffers()], [*model.parameters(), *model.buffers()])
            pairs = [(a, m) for a, m in pairs if a.is_floating_point()]
            self.ema_averaged, self.ema_live = [a for a, _ in pairs], [m for _, m in pairs]
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
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return self.update(step)

    def update(self, step: int) -> torch.Tensor:
        """The part of :meth:`step` after the backward pass, on the gradients in the parameters' ``.grad``."""
        optimizer, scaler = self.optimizer, self.scaler
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_norm).to(self.level.dtype)
        finite = torch.isfinite(norm)
        log_norm = torch.log(norm.clamp(min=1e-30))
        learnt = torch.logical_not(torch.isnan(self.level))
        made = finite
        if step >= WARMUP_STEPS:
            made = made & torch.logical_not(learnt & (log_norm > self.level + self.log_skip_factor))  # not a spike
        moved = torch.where(learnt, DECAY * self.level + (1 - DECAY) * log_norm, log_norm)
        self.level.copy_(torch.where(finite, moved, self.level))
        skipped = torch.logical_not(made).long()
        self.skipped.add_(skipped)
        self.consecutive.mul_(skipped).add_(skipped)
        if self.fused:
            optimizer.found_inf = skipped.float()  # read by the fused kernel: no update, no step count
            optimizer.step()
            del optimizer.found_inf
        elif self.masked_adamax:
            masked_adamax_step(optimizer, made)
        elif made.item():  # another optimizer: one host sync
            optimizer.step()
        scaler.update()  # fp16: lowers the scale after an overflow
        if self.ema is not None:  # averaged += w·(live − averaged), w = 0 on a skipped step
            with torch.no_grad():  # one product with a 0-dim device tensor: a fused kernel on CUDA
                moves = torch._foreach_sub(self.ema_live, self.ema_averaged)
                torch._foreach_mul_(moves, made.to(torch.float32) * self.ema_weight)
                torch._foreach_add_(self.ema_averaged, moves)
            self.ema.n_averaged.add_(made.long().to(self.ema.n_averaged.device))
        return made
