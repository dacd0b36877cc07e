"""Train a VAE with a flow posterior: one plain function, a checkpoint dict, a run directory.

Run directory ``out/``:
    config.yaml          the resolved configuration
    checkpoint.pt        model, optimizer, RNG states, history (atomic; every epoch)
    best.pt              weights with the best validation -ELBO
    metrics.jsonl/.csv   one row per epoch
    samples.png, reconstructions.png, results.json

``resume=True`` continues from ``checkpoint.pt``; the RNG states are restored, so a killed run
resumed ends with bit-identical parameters to a run that was never interrupted.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from flowvae import distributed, objectives
from flowvae.config import MODEL_FIELDS, TrainConfig
from flowvae.data import DataError, DatasetSplits, load_dataset
from flowvae.evaluation import autocast, evaluate, posterior_diagnostics
from flowvae.io import atomic_torch_save, atomic_write_text, remove_stale_temporaries
from flowvae.models import VAE, as_unit_interval, build_vae, count_parameters, default_likelihood
from flowvae.objectives import bits_per_dim
from flowvae.plots import save_image_grid

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or belongs to another model."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return device


@dataclass
class PreparedData:
    """Splits ready for the model: valid/test of 'grayscale' data are binarized once (fixed seed)."""

    splits: DatasetSplits
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    train_eval: torch.Tensor   # the training set as evaluated (fixed binarization)
    dynamic: bool              # binarize training batches afresh


def prepare_data(config: TrainConfig) -> PreparedData:
    splits = load_dataset(config.dataset, config.data_dir, seed=config.seed)
    for name, t in (("train", splits.train), ("valid", splits.valid), ("test", splits.test)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"{splits.name}: the {name} split contains NaN or infinite values")
        if len(t) == 0:
            raise DataError(f"{splits.name}: the {name} split is empty")
    dynamic = splits.kind == "grayscale"
    if dynamic:
        g = torch.Generator().manual_seed(config.seed + 1)
        fixed = [torch.bernoulli(t, generator=g) for t in (splits.valid, splits.test, splits.train)]
        return PreparedData(splits, splits.train, fixed[0], fixed[1], fixed[2], True)
    return PreparedData(splits, splits.train, splits.valid, splits.test, splits.train, False)


def model_from_config(config: TrainConfig, image_shape, data_kind: str) -> VAE:
    return build_vae(config.arch, image_shape, config.latent_dim,
                     config.likelihood or default_likelihood(data_kind), config.hidden, config.feature_dim,
                     config.flow, config.flow_steps, config.flow_hidden, config.reflections, data_kind=data_kind,
                     flow_context=config.flow_context)


def load_checkpoint(path: str | Path, config: TrainConfig | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); check it was written for ``config``'s model."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated/corrupt/foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a flowvae checkpoint "
                              f"({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a flowvae checkpoint (format {CHECKPOINT_FORMAT})")
    if config is not None:
        saved = TrainConfig().to_dict() | ckpt["config"]  # a key added since the checkpoint keeps its default
        diffs = [f"{k}={saved[k]!r} there, {getattr(config, k)!r} here" for k in MODEL_FIELDS
                 if saved[k] != getattr(config, k)]
        if diffs:
            raise CheckpointError(f"checkpoint {path} was written for a different model: {'; '.join(diffs)}")
    return ckpt


def _write_history(out: Path, history: list[dict[str, float]]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    if history:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(out / "metrics.csv", buffer.getvalue())


def _save_checkpoint(path: Path, model: VAE, optimizer, config: TrainConfig, state: dict, history: list,
                     generators: dict[str, torch.Generator]) -> None:
    atomic_torch_save({
        "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "config": config.to_dict(), "state": state, "history": history,
        "rng": {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}},
    }, path)


def train(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train, early-stop on validation -ELBO, evaluate the best model; returns results.json's content.

    Under ``torchrun`` the model is wrapped in DistributedDataParallel: every worker draws the same
    global batch, noise and binarization from shared generators and takes its shard, and the loss is
    scaled so that the averaged gradient equals the single-process gradient of the global batch.
    So a run gives the same parameters on any number of workers (up to float summation order) and
    a checkpoint resumes on any number of workers.  Only worker 0 writes files.
    """
    config.validate()
    context, device_name = distributed.setup(config.device)
    try:
        return _train(config, resume, context, resolve_device(device_name))
    finally:
        distributed.teardown()


def _train(config: TrainConfig, resume: bool, context: distributed.Context, device: torch.device) -> dict[str, Any]:
    out = Path(config.out)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise CheckpointError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not ckpt_path.exists():
        raise CheckpointError(f"--resume given but {ckpt_path} does not exist")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    data = prepare_data(config)
    model = model_from_config(config, data.splits.image_shape, data.splits.kind).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    # Shuffling and binarization (CPU) and reparameterisation noise (device): the same on every worker.
    generators = {"shuffle": torch.Generator().manual_seed(config.seed),
                  "noise": torch.Generator(device).manual_seed(config.seed + 2)}
    state = {"epoch": 0, "step": 0, "best_valid": math.inf, "best_epoch": -1, "epochs_since_best": 0,
             "stopped_early": False, "train_seconds": 0.0}
    history: list[dict[str, float]] = []

    if resume:
        ckpt = load_checkpoint(ckpt_path, config)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state, history = ckpt["state"], ckpt["history"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        for name, generator in generators.items():
            generator.set_state(ckpt["rng"][name])
        logger.info("resumed %s at epoch %d", out, state["epoch"])
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for path in remove_stale_temporaries(out):
            logger.info("removed %s, left by an interrupted write", path)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))

    step_model = model
    if context.distributed:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        step_model = torch.compile(step_model)
    n_train = len(data.train)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    warmup_steps = config.warmup_epochs * steps_per_epoch
    start_time = time.perf_counter() - state["train_seconds"]
    eval_kwargs = {"batch_size": config.eval_batch_size, "device": device, "seed": config.seed, "context": context,
                   "precision": config.precision}
    logger.info("%s: %d parameters, %s, %d workers, %d training images", config.dataset, count_parameters(model),
                device, context.world_size, n_train)

    epochs = tqdm(range(state["epoch"], config.epochs), desc="epochs", initial=state["epoch"], total=config.epochs,
                  disable=not (config.progress and context.is_main))
    for epoch in epochs:
        if state["stopped_early"] or _out_of_time(config, state, context):
            break
        model.train()
        order = torch.randperm(n_train, generator=generators["shuffle"])
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, n_train, config.batch_size):
            x = data.train[order[start:start + config.batch_size]]  # the global batch
            global_batch = len(x)
            if data.dynamic:
                x = torch.bernoulli(x, generator=generators["shuffle"])
            noise = torch.randn(1, global_batch, model.latent_dim, generator=generators["noise"], device=device)
            shard = torch.tensor_split(torch.arange(global_batch), context.world_size)[context.rank]
            x, noise = x[shard].to(device, non_blocking=True), noise[:, shard.to(device)]
            beta = min(1.0, (state["step"] + 1) / warmup_steps) if warmup_steps > 0 else 1.0
            with autocast(device, config.precision):
                ld = step_model(x, noise=noise)
            # Σ over the shard / (global batch / W): DDP's gradient average is then the global batch mean.
            loss = objectives.training_loss(ld, beta, config.free_bits, normalizer=global_batch / context.world_size)
            global_loss = context.all_reduce_sum(loss.detach().double().clone()) / context.world_size
            if not torch.isfinite(global_loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1}, step {state['step']}; "
                                         f"the last good checkpoint is {ckpt_path}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            loss_sum += global_loss * global_batch
            state["step"] += 1
        valid = evaluate(model, data.valid, **eval_kwargs)
        state["epoch"] = epoch + 1
        state["train_seconds"] = time.perf_counter() - start_time
        row = {"epoch": epoch + 1, "step": state["step"], "beta": beta, "train_loss": loss_sum.item() / n_train,
               "valid_neg_elbo": valid["neg_elbo"], "valid_reconstruction": valid["reconstruction"],
               "valid_kl": valid["kl"], "lr": optimizer.param_groups[0]["lr"],
               "seconds": round(state["train_seconds"], 3)}
        history.append(row)
        improved = valid["neg_elbo"] < state["best_valid"]
        if improved:
            state.update(best_valid=valid["neg_elbo"], best_epoch=epoch + 1, epochs_since_best=0)
        else:
            state["epochs_since_best"] += 1
            if config.lr_decay < 1 and state["epochs_since_best"] % config.lr_patience == 0:
                for group in optimizer.param_groups:  # saved with the optimizer's state, so resume keeps it
                    group["lr"] *= config.lr_decay
        if config.patience and state["epochs_since_best"] >= config.patience:
            state["stopped_early"] = True
        if context.is_main:
            if improved:
                atomic_torch_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                                   "config": config.to_dict(), "epoch": epoch + 1}, out / "best.pt")
            _save_checkpoint(ckpt_path, model, optimizer, config, state, history, generators)
            _write_history(out, history)
        epochs.set_postfix(loss=f"{row['train_loss']:.2f}", valid=f"{valid['neg_elbo']:.2f}")
        logger.info("epoch %d  train loss %.3f  valid -ELBO %.3f  (β=%.2f)", epoch + 1, row["train_loss"],
                    valid["neg_elbo"], beta)
    epochs.close()
    context.barrier()
    return finish(config, model, data, state, device, context)


def _out_of_time(config: TrainConfig, state: dict, context: distributed.Context) -> bool:
    """The wall-clock budget is spent, as worker 0's clock says (so all workers agree)."""
    if not config.max_minutes:
        return False
    over = torch.tensor(float(context.is_main and state["train_seconds"] > 60 * config.max_minutes))
    return bool(context.all_reduce_sum(over) > 0)


def finish(config: TrainConfig, model: VAE, data: PreparedData, state: dict, device: torch.device,
           context: distributed.Context = distributed.Context()) -> dict[str, Any]:
    """Evaluate the best weights on train/valid/test, write plots and results.json (worker 0)."""
    out = Path(config.out)
    best = load_checkpoint(out / "best.pt", config)
    model.load_state_dict(best["model"])
    model.eval()
    kwargs = {"batch_size": config.eval_batch_size, "device": device, "progress": config.progress,
              "seed": config.seed, "context": context, "precision": config.precision}
    results: dict[str, Any] = {
        "dataset": config.dataset, "flow": config.flow, "flow_steps": config.flow_steps if config.flow != "none" else 0,
        "arch": config.arch, "latent_dim": config.latent_dim, "parameters": count_parameters(model),
        "epochs_trained": state["epoch"], "best_epoch": state["best_epoch"], "stopped_early": state["stopped_early"],
        "train_minutes": round(state["train_seconds"] / 60, 3), "workers": context.world_size,
        "objective": {"warmup_epochs": config.warmup_epochs, "free_bits": config.free_bits},
        "train": evaluate(model, data.train_eval, desc="train -ELBO", **kwargs),
        "valid": evaluate(model, data.valid, desc="valid -ELBO", **kwargs),
        "test": evaluate(model, data.test, samples=config.eval_samples, desc=f"test -log p(x), K={config.eval_samples}",
                         **kwargs),
    }
    if data.splits.kind == "8bit":
        offset = model.likelihood.discrete_nats_offset(data.splits.dim)
        results["test"]["bits_per_dim"] = bits_per_dim(results["test"]["nll"] + offset, data.splits.dim)
        results["test"]["neg_elbo_bits_per_dim"] = bits_per_dim(results["test"]["neg_elbo"] + offset, data.splits.dim)
    if context.is_main:
        torch.manual_seed(config.seed)
        results["diagnostics"] = posterior_diagnostics(model, data.test, batch_size=config.eval_batch_size,
                                                       device=device)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        save_image_grid(model.sample(64, generator), out / "samples.png", nrow=8)
        originals = data.test[:32].to(device)
        recon = model.reconstruct(originals)
        pairs = torch.stack([as_unit_interval(originals, recon.dtype), recon], 1).flatten(0, 1)  # original, recon, ...
        save_image_grid(pairs, out / "reconstructions.png", nrow=8)
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        logger.info("test -ELBO %.3f  -log p(x) %.3f (K=%d)", results["test"]["neg_elbo"], results["test"]["nll"],
                    config.eval_samples)
    context.barrier()
    return results

