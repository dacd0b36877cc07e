"""One epoch of training (:func:`train_epoch`) and what follows it (:func:`end_epoch`).

Every worker draws the same global batch, noise and binarization from the run's generators and
steps on its own shard; the loss is scaled so that DDP's averaged gradient is the gradient of the
global batch's mean.  After the epoch: validation, the best weights, the learning rate's decay,
early stopping, the epoch's files and the divergence check.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from flowvae import distributed, objectives, schedules
from flowvae.evaluation import autocast, evaluate
from flowvae.interrupts import raise_pending
from flowvae.models import as_unit_interval, draw_noise
from flowvae.models.base import select_noise
from flowvae.progress import Throughput, is_terminal, plain_line
from flowvae.training.outputs import write_epoch
from flowvae.training.safeguards import check_divergence, guarded_step, sync_guard
from flowvae.training.state import Run, progress_bars

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- one epoch


def _shard(batch: int, context: distributed.Context) -> slice:
    """Worker r's contiguous part of a global batch, as ``torch.tensor_split`` would cut it."""
    base, extra = divmod(batch, context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return slice(start, start + base + (context.rank < extra))


def _noisy_input(run: Run, x: torch.Tensor) -> torch.Tensor:
    """The encoder's input in training: x in [0, 1] plus N(0, input_noise²) noise, drawn for the
    global batch from the noise generator (amortized inference regularization, Shu et al. 2018)."""
    x = as_unit_interval(x.to(run.device), run.model.dtype)
    return x + run.config.input_noise * torch.randn(
        x.shape, generator=run.generators["noise"], device=run.device, dtype=x.dtype
    )


def _schedule_lr(run: Run) -> None:
    """This step's learning rate from the budget-aware schedule (:mod:`flowvae.schedules`)."""
    config, state = run.config, run.state
    total = state.lr_total_steps or config.epochs * run.steps_per_epoch
    lr = schedules.scheduled_lr(config.lr_schedule, config.lr, config.lr_floor, state.step + 1, total)
    for group in run.optimizer.param_groups:
        group["lr"] = lr


def train_epoch(run: Run) -> dict[str, float]:
    """One pass over the training set in global batches; every worker takes its shard."""
    config, state, data, context, device = run.config, run.state, run.data, run.context, run.device
    run.model.train()
    n_train = len(data.train)
    warmup_steps = config.warmup_epochs * run.steps_per_epoch
    order = torch.randperm(n_train, generator=run.generators["shuffle"]).to(data.train.device)
    binarize = run.generators.get("binarize", run.generators["shuffle"])
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    beta = 1.0
    throughput = Throughput()
    bar = tqdm(
        range(0, n_train, config.batch_size),
        desc=f"epoch {state.epoch + 1}",
        leave=False,
        unit="step",
        disable=not progress_bars(run),
    )
    for start in bar:
        # The global batch, its noise and the encoder's noisy input: drawn alike on every worker.
        x = data.train[order[start : start + config.batch_size]]
        global_batch = len(x)
        if data.dynamic:
            x = torch.bernoulli(x, generator=binarize)
        samples = config.train_samples
        raise_pending()  # a Ctrl-C that landed in a finalizer, where Python only prints it
        noise = draw_noise(run.model, samples, global_batch, generator=run.generators["noise"], device=device)
        encoder_input = _noisy_input(run, x) if config.input_noise > 0 else None
        shard = _shard(global_batch, context)  # this worker's contiguous slice
        x, noise = x[shard].to(device, non_blocking=True), select_noise(noise, shard)
        if encoder_input is not None:
            encoder_input = encoder_input[shard]
        # KL warm-up and the learning rate of this step.
        beta = min(1.0, (state.step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if config.lr_schedule != "constant":
            _schedule_lr(run)
        # Forward, loss, and an update unless the gradient is non-finite or a spike.
        with autocast(device, config.precision):
            ld = run.step_model(
                x, samples, noise=noise, path_gradient=config.gradient != "reparam", encoder_input=encoder_input
            )
        # Σ over the shard / (global batch / W): DDP's gradient average is then the global batch mean.
        loss = objectives.training_loss(
            ld,
            beta,
            config.free_bits,
            normalizer=global_batch / context.world_size,
            objective=config.objective,
            gradient=config.gradient,
        )
        guarded_step(run, loss)
        loss_sum += torch.where(torch.isfinite(loss), loss.detach() * (global_batch / context.world_size), 0.0)
        state.step += 1
        # Logging: TensorBoard per step, the progress bar once a second.
        if run.tensorboard is not None:  # worker 0's shard, read on the host every step
            run.tensorboard.scalars(
                state.step,
                {
                    "train/loss": loss.item(),
                    "train/reconstruction": -ld.log_likelihood.detach().mean().item(),
                    "train/kl": ld.kl.detach().mean().item(),
                    "train/beta": beta,
                    "train/lr": run.optimizer.param_groups[0]["lr"],
                    "train/skipped_updates": run.guard.skipped.item(),
                },
            )
        throughput.add(global_batch)
        if not bar.disable and throughput.due():  # a windowed rate, refreshed every second
            bar.set_postfix(loss=f"{loss.item():.2f}", img_s=f"{throughput.images_per_second():.0f}")
    bar.close()
    sync_guard(run)
    loss_sum = context.all_reduce_sum(loss_sum)  # the one collective of the epoch outside DDP's own
    seconds = throughput.seconds()
    return {
        "train_loss": loss_sum.item() / n_train,
        "beta": beta,
        "seconds": seconds,
        "images_per_s": n_train / max(seconds, 1e-9),
    }


# ------------------------------------------------------------------------------------ end of epoch


def end_epoch(run: Run, stats: dict[str, float]) -> None:
    """Validate, keep the best weights, decay the learning rate, stop early or on divergence, write."""
    config, state = run.config, run.state
    valid = evaluate(run.eval_model, run.data.valid, **run.eval_kwargs())
    state.epoch += 1
    state.train_seconds = run.clock()
    if config.lr_schedule != "constant" and config.max_minutes:  # worker 0's rate, so all workers agree
        seconds = torch.tensor(float(run.context.is_main) * state.train_seconds, dtype=torch.float64, device=run.device)
        state.lr_total_steps = schedules.budget_steps(
            state.step,
            run.context.all_reduce_sum(seconds).item(),
            config.max_minutes,
            config.epochs * run.steps_per_epoch,
        )
    # The epoch's row of metrics.
    row = {
        "epoch": state.epoch,
        "step": state.step,
        "beta": stats["beta"],
        "train_loss": stats["train_loss"],
        "valid_neg_elbo": valid["neg_elbo"],
        "valid_reconstruction": valid["reconstruction"],
        "valid_kl": valid["kl"],
        "lr": run.optimizer.param_groups[0]["lr"],
        "skipped_updates": state.skipped_updates,
        "seconds": round(state.train_seconds, 3),
    }
    if len(valid["kl_groups"]) > 1:
        row |= {f"valid_kl_{name}": value for name, value in valid["kl_groups"].items()}
    state.history.append(row)
    # The best epoch, the learning rate's decay on a plateau, early stopping.
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
    # Files, the epoch's line, and the divergence check.
    if run.context.is_main:
        write_epoch(run, improved)
    line = (
        f"epoch {state.epoch}/{config.epochs}  train loss {row['train_loss']:.3f}  valid -ELBO "
        f"{valid['neg_elbo']:.3f}  (β={stats['beta']:.2f})  {stats['seconds']:.1f} s  "
        f"{stats['images_per_s']:.0f} images/s"
    )
    if logger.isEnabledFor(logging.INFO):
        logger.info(line)
    elif config.progress and run.context.is_main and not is_terminal():  # a log file: plain lines, no bars
        plain_line(line)
    check_divergence(run, valid["neg_elbo"])
