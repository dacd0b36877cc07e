"""What a run is built from: the device and its numerics switches, the data, the random generators,
the moving average of the weights and the model as stepped (DistributedDataParallel, compiled)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel

from flowvae import distributed
from flowvae.config import TrainConfig
from flowvae.data import DataError, DatasetSplits, load_dataset
from flowvae.data.files import ARRAYS, is_data_path, load_path
from flowvae.parallelism import warn_if_oversubscribed


def resolve_device(name: str) -> torch.device:
    """``'auto'`` (CUDA if available, else the CPU), ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` as a
    device; a one-line ``ValueError`` for a name that is wrong or unavailable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def configure_backends(config: TrainConfig, device: torch.device) -> None:
    """Numerics switches: TF32 (``tf32``), deterministic algorithms (``deterministic``); cuDNN's
    autotuning (``cudnn.benchmark``, which changes no precision) unless ``deterministic``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":
        warn_if_oversubscribed(torch.get_num_threads())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
        torch.set_float32_matmul_precision("high" if config.tf32 else "highest")
        torch.backends.cudnn.benchmark = not config.deterministic
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=False)


# --------------------------------------------------------------------------------------------- data


@dataclass
class PreparedData:
    """Splits ready for the model: valid/test of 'grayscale' data are binarized once (fixed seed)."""

    splits: DatasetSplits
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    train_eval: torch.Tensor  # the training set as evaluated (fixed binarization)
    dynamic: bool  # binarize training batches afresh

    def split(self, name: str) -> torch.Tensor:
        """Split ``name`` ('train', 'valid' or 'test') as it is evaluated (the training set binarized once)."""
        return {"train": self.train_eval, "valid": self.valid, "test": self.test}[name]


def load_splits(config: TrainConfig) -> DatasetSplits:
    """``config.dataset``'s splits: a registered name or a folder/.npy/.npz path."""
    if config.dataset == ARRAYS:
        raise DataError(
            "this run was trained on arrays given to flowvae.fit, which it does not keep: give the "
            "images as a file (flowvae evaluate --data PATH; TrainedRun.evaluate(path=...)), "
            "or the arrays to flowvae.fit again to resume"
        )
    if is_data_path(config.dataset):
        return load_path(
            config.dataset,
            kind=config.data_kind,
            valid_fraction=config.valid_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
        )
    return load_dataset(config.dataset, config.data_dir, seed=config.seed)


def prepare_data(config: TrainConfig, splits: DatasetSplits | None = None) -> PreparedData:
    """The run's data: ``splits`` when given (``flowvae.fit``), else ``config.dataset``'s, a
    registered name or a folder/.npy/.npz path (:mod:`flowvae.data.files`)."""
    if splits is None:
        splits = load_splits(config)
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


# ---------------------------------------------------------------------- generators, EMA, the stepped model


def build_generators(config: TrainConfig, device: torch.device) -> dict[str, torch.Generator]:
    """Shuffling and binarization (CPU) and the posterior's noise (device): the same on every worker."""
    generators = {
        "shuffle": torch.Generator().manual_seed(config.seed),
        "noise": torch.Generator(device).manual_seed(config.seed + 2),
    }
    if device.type != "cpu":  # dynamic binarization where the data are (on a CPU it draws from "shuffle")
        generators["binarize"] = torch.Generator(device).manual_seed(config.seed + 3)
    return generators


def build_ema(config: TrainConfig, model: torch.nn.Module) -> AveragedModel | None:
    """The container of the weights' moving average (None without ``config.ema``)."""
    if not config.ema:
        return None
    # The container only (weights and n_averaged, saved with the run): GradientGuard does the averaging.
    ema = AveragedModel(model, use_buffers=True)
    # n_averaged on the model's device: on the CPU its per-step update would be a device-to-host copy.
    ema.n_averaged = torch.zeros((), dtype=torch.long, device=next(model.parameters()).device)
    return ema


def stepped_model(
    model: torch.nn.Module, config: TrainConfig, context: distributed.Context, device: torch.device
) -> torch.nn.Module:
    """The model as stepped: DDP-wrapped under ``torchrun`` and/or compiled."""
    step_model: torch.nn.Module = model
    if context.distributed:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            gradient_as_bucket_view=True,
        )
    if config.compile:
        step_model = torch.compile(step_model)
    return step_model
