"""The checkpoint dict: its format, loading it safely, the state and RNG it carries, and the resume policy.

``checkpoint.pt`` (written every epoch, atomically)::

    {"format": 2, "model": state_dict, "optimizer": state_dict, "data": the data's description and model class,
     "ema": state_dict or None, "config": TrainConfig.to_dict(), "state": RunState without its history,
     "history": [one row per epoch], "rng": {"torch", "noise_device", "cuda" (on CUDA), one per generator}}

``best.pt`` holds ``{"format", "model" (the evaluation weights), "config", "epoch", "data"}``.  Format 1
(flowvae before hierarchical models) had a flat config and no EMA; it is read too.

On resume the options in :data:`MUST_MATCH_ON_RESUME` must be those the run was started with; any
other may change, takes effect at once and is recorded in the run state (:func:`apply_changes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowvae.config import ConfigError, TrainConfig
from flowvae.models import MODEL_FIELDS
from flowvae.optimizers import set_weight_decay

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1: flat config, no EMA (flowvae before hierarchical models)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or belongs to another model."""


@dataclass
class RunState:
    """Everything about the run's progress that a checkpoint must carry."""

    epoch: int = 0
    step: int = 0
    best_valid: float = math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    skipped_updates: int = 0
    consecutive_skips: int = 0
    log_grad_norm_level: float | None = None  # the gradient guard's running level of log ‖g‖
    diverging_epochs: int = 0
    lr_total_steps: float | None = None  # the lr schedule's length in steps, as the budget allows
    history: list[dict[str, Any]] = field(default_factory=list)
    config_changes: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------ resume policy

# Options that define what is trained: a resumed run must keep them (the model fields too).
MUST_MATCH_ON_RESUME = (
    "dataset",
    "data_kind",
    "valid_fraction",
    "test_fraction",
    "seed",
    "batch_size",
    "optimizer",
    "precision",
) + MODEL_FIELDS


def _upgrade(saved: dict[str, Any]) -> dict[str, Any]:
    """A config written by an older flowvae (flat, fewer keys) as today's: missing keys keep their defaults."""
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(MODEL_FIELDS)  # "model" included
    return {k: v for k, v in saved.items() if k in known}


def resume_differences(saved: dict[str, Any], config: TrainConfig) -> tuple[list[str], dict[str, tuple]]:
    """Compare a checkpoint's config with ``config``: (refused fields, allowed changes {name: (old, new)})."""
    old = TrainConfig.from_dict(_upgrade(saved), source="checkpoint").flat()
    new = config.flat()
    changed = {k: (old[k], new[k]) for k in new if old.get(k) != new[k]}
    refused = [f"{k}={old[k]!r} there, {new[k]!r} here" for k in MUST_MATCH_ON_RESUME if k in changed]
    allowed = {k: v for k, v in changed.items() if k not in MUST_MATCH_ON_RESUME and k != "out"}
    return refused, allowed


def apply_changes(
    saved_config: dict[str, Any], config: TrainConfig, optimizer: torch.optim.Optimizer, state: RunState
) -> None:
    """Options that may change on resume take effect now, and the change is recorded."""
    _, changed = resume_differences(saved_config, config)
    if "lr" in changed:
        for group in optimizer.param_groups:
            group["lr"] = config.lr
    if "weight_decay" in changed:
        set_weight_decay(optimizer, config.weight_decay)
    if changed:
        state.config_changes.append(
            {
                "epoch": state.epoch,
                "step": state.step,
                **{k: {"from": old, "to": new} for k, (old, new) in changed.items()},
            }
        )
        logger.warning(
            "resumed with changed options: %s",
            ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()),
        )


# ----------------------------------------------------------------------------------------- loading


def load_checkpoint(path: str | Path, config: TrainConfig | None = None, *, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); check it was written for ``config``'s model.

    Checkpoints of format 1 (flat config) are read too; their config is upgraded on the fly.
    ``mmap=True`` maps the tensors instead of reading them: a cheap look at the config and state."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for truncated/corrupt/foreign files
        raise CheckpointError(
            f"checkpoint {path} is corrupt, truncated or not a flowvae checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a flowvae checkpoint (formats {READABLE_FORMATS})")
    if not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} has no config; it was not written by flowvae train")
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    if config is not None:
        try:
            refused, _ = resume_differences(ckpt["config"], config)
        except ConfigError as err:
            raise CheckpointError(f"checkpoint {path} has an unreadable config: {err}") from None
        if refused:
            what = "model" if any(r.split("=")[0] in MODEL_FIELDS for r in refused) else "run"
            raise CheckpointError(f"checkpoint {path} was written for a different {what}: {'; '.join(refused)}")
    return ckpt


def load_weights(model: torch.nn.Module, weights: Any, path: Path) -> None:
    """``model.load_state_dict`` with a one-line error for weights of another model or non-finite weights."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError, KeyError) as err:
        # torch's message opens with "Error(s) in loading state_dict for VAE:"; the first problem follows.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if not line.startswith("Error(s) in loading")), None)
        detail = (detail or type(err).__name__).rstrip(".")
        if len(lines) > 2:
            detail += f" (and {len(lines) - 2} more)"
        raise CheckpointError(f"checkpoint {path} does not fit this model: {detail}") from None
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); "
            "it cannot be evaluated or resumed"
        )


def saved_epoch(path: Path) -> object:
    """The epoch that the weights file ``path`` (best.pt) records; None when it is missing, truncated
    or foreign (a cheap, memory-mapped look)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception:  # noqa: BLE001 (missing, truncated or foreign)
        return None


def check_resumable(path: Path, config: TrainConfig) -> None:
    """Refuse, before any data are loaded, a checkpoint of another run, one that holds weights only,
    or ``config.epochs`` below the epochs it has already trained (a cheap, memory-mapped look)."""
    ckpt = load_checkpoint(path, config, mmap=True)
    missing = [k for k in ("optimizer", "state", "history", "rng") if not isinstance(ckpt.get(k), (dict, list))]
    if missing:
        raise CheckpointError(
            f"{path} has no {', '.join(missing)}: it holds weights only (like best.pt) and cannot be resumed"
        )
    done = ckpt["state"].get("epoch", 0)
    del ckpt
    if config.epochs < done:
        raise ConfigError(
            f"--epochs {config.epochs} is below the {done} epochs {path.parent} has already trained; "
            f"give --epochs {done} or more"
        )


# --------------------------------------------------------------------------------------- RNG states


def device_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The CUDA device's global generator (what draws without a generator, e.g. the Gaussian
    likelihood's dequantization noise), saved with the run: {} on a CPU, whose global state is saved apart."""
    return {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}


def restore_rng(
    saved: dict[str, torch.Tensor],
    generators: dict[str, torch.Generator],
    device: torch.device,
    config: TrainConfig,
    state: RunState,
) -> None:
    """Continue every random stream where the checkpoint left it; on another device type, reseed
    the device's generators from (seed, step) and say so."""
    torch.set_rng_state(saved["torch"])
    generators["shuffle"].set_state(saved["shuffle"])
    saved_device = saved.get("noise_device", "cpu")  # format 1 checkpoints were all written on CPUs
    device_generators = [name for name in generators if name != "shuffle"]
    if saved_device == device.type:
        with contextlib.suppress(RuntimeError, KeyError):
            for name in device_generators:
                generators[name].set_state(saved[name])
            if "cuda" in saved and device.type == "cuda":  # absent from checkpoints of flowvae before this
                torch.cuda.set_rng_state(saved["cuda"], device)
            return
    # A generator's state is device-specific: reseed from (seed, step), deterministically, and say so.
    for offset, name in enumerate(device_generators):
        generators[name].manual_seed(config.seed * 1_000_003 + state.step + 2 + offset)
    logger.warning(
        "resumed on %s a run saved on %s: the posterior noise is reseeded from (seed, step), so the "
        "run continues deterministically but not bit-identically",
        device.type,
        saved_device,
    )


# ------------------------------------------------------------------------------ writing and resuming


def model_class(model: torch.nn.Module) -> str:
    """``module.QualifiedName`` of the model's class, recorded with its weights."""
    return f"{type(model).__module__}.{type(model).__qualname__}"


def checkpoint_dict(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: dict[str, Any],
    ema: torch.nn.Module | None,
    config: TrainConfig,
    state: RunState,
    generators: dict[str, torch.Generator],
    device: torch.device,
) -> dict[str, Any]:
    """checkpoint.pt's content: everything a resumed run needs to continue bit-identically."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data": data,
        "ema": ema.state_dict() if ema is not None else None,
        "config": config.to_dict(),
        "state": {k: v for k, v in dataclasses.asdict(state).items() if k != "history"},
        "history": state.history,
        "rng": {
            "torch": torch.get_rng_state(),
            "noise_device": device.type,
            **device_rng_state(device),
            **{k: g.get_state() for k, g in generators.items()},
        },
    }


def best_dict(model: torch.nn.Module, config: TrainConfig, epoch: int, data: dict[str, Any]) -> dict[str, Any]:
    """best.pt's content: the evaluation weights, the config and the data's description."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "config": config.to_dict(),
        "epoch": epoch,
        "data": data,
    }


def resume_from(
    path: Path,
    config: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    device: torch.device,
) -> tuple[RunState, dict[str, Any]]:
    """Restore the weights, the optimizer, the run state and the RNG states from ``path``, and apply
    the options that changed; returns the run state and the checkpoint (for its EMA weights)."""
    ckpt = load_checkpoint(path, config)
    load_weights(model, ckpt["model"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as error:  # e.g. a planar stack saved as one-step modules (older flowvae)
        raise CheckpointError(
            f"cannot resume from {path}: its optimizer state does not match "
            f"this model's parameters ({error}); its weights still load with "
            "'flowvae evaluate', or start a new run"
        ) from None
    state = RunState(
        **{k: v for k, v in ckpt["state"].items() if k in RunState.__dataclass_fields__}, history=ckpt["history"]
    )
    restore_rng(ckpt["rng"], generators, device, config, state)
    apply_changes(ckpt["config"], config, optimizer, state)
    return state, ckpt
