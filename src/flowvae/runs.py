"""Runs from Python: :func:`fit` trains on arrays, tensors or a path; :func:`load_run` loads any run.

Both go through the trainer of ``flowvae train`` (run directory, checkpoints, resume, DDP under
``torchrun``, every check), and a run needs no data files to be used afterwards: its checkpoints
record the image shape, channels and data kind.

Examples:
    >>> import tempfile, numpy as np, flowvae
    >>> from pathlib import Path
    >>> tmp = Path(tempfile.mkdtemp())
    >>> x = (np.random.default_rng(0).random((200, 8, 8)) > 0.5).astype(np.uint8)
    >>> model, run = flowvae.fit(train=x[:180], test=x[180:], out=str(tmp / "fit"), epochs=1, hidden=16,
    ...                          latent_dim=2, eval_samples=5, progress=False)
    >>> run.data["kind"], run.data["image_shape"], run.data["sizes"]
    ('binary', [1, 8, 8], {'train': 162, 'valid': 18, 'test': 20})
    >>> np.save(tmp / "test.npy", x[180:])
    >>> again = flowvae.load_run(tmp / "fit")                   # no arrays needed
    >>> again.evaluate("test", path=tmp / "test.npy") == run.results["test"]
    True
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowvae.config import ConfigError, TrainConfig
from flowvae.config_yaml import load_yaml
from flowvae.data import DataError, DatasetSplits
from flowvae.data.files import ARRAYS, is_data_path, load_images_for, splits_from_arrays
from flowvae.evaluation import evaluate
from flowvae.models import LatentVariableModel, build_model
from flowvae.training import CheckpointError, load_checkpoint, load_weights, model_class, prepare_data, resolve_device
from flowvae.training import train as train_run

__all__ = ["TrainedRun", "fit", "load_run"]

CHECKPOINTS = {"best": "best.pt", "last": "checkpoint.pt", "checkpoint": "checkpoint.pt"}


@dataclass
class TrainedRun:
    """A run directory loaded for inference: its model (in eval mode), config and results.

    ``data`` is what the run recorded about its data: ``name``, ``kind``, ``image_shape``
    ``[C, H, W]``, ``channels`` and the split ``sizes``."""

    path: Path
    model: LatentVariableModel
    config: TrainConfig
    results: dict[str, Any] | None
    data: dict[str, Any]
    device: torch.device
    checkpoint: str
    splits: DatasetSplits | None = field(default=None, repr=False)  # the arrays given to fit()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the model was trained on."""
        c, h, w = self.data["image_shape"]
        return (c, h, w)

    @property
    def kind(self) -> str:
        """``'binary'``, ``'grayscale'`` or ``'8bit'``."""
        return self.data["kind"]

    def images(self, split: str = "test", path: str | Path | None = None) -> torch.Tensor:
        """The images of ``split`` as the run scores them, ``(N, C, H, W)``: from ``path`` (a folder,
        ``.npy`` or ``.npz``, checked against the run's shape and kind; all of it when it has no
        splits; or a registered data set's name) or else from the run's own data set.  Grayscale images
        are binarized once with the run's seed, as the trainer does."""
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split must be train, valid or test, got {split!r}")
        if path is None:
            try:
                data = prepare_data(self.config, self.splits)
            except DataError as err:
                raise DataError(
                    f"the run's own data cannot be read: {err} (score other images with --data PATH, "
                    "or path= in Python)"
                ) from None
            return data.split(split)
        if not is_data_path(str(path)):  # a registered data set's split
            images = _registered_split(str(path), split, self.config.data_dir, self.config.seed)
            if images.shape[1:] != self.image_shape or _kind_of(images) not in (self.kind, "binary"):
                raise DataError(
                    f"data set {path} holds {_kind_of(images)} images of shape {tuple(images.shape[1:])} "
                    f"(C, H, W) but the run was trained on {self.kind} images of shape {self.image_shape}"
                )
            return images
        images = load_images_for(path, self.kind, self.image_shape, split)
        if self.kind == "grayscale":
            images = torch.bernoulli(images, generator=torch.Generator().manual_seed(self.config.seed + 1))
        return images

    def evaluate(
        self, split: str = "test", *, samples: int | None = None, path: str | Path | None = None, progress: bool = False
    ) -> dict[str, Any]:
        """:func:`flowvae.evaluation.evaluate` with the run's settings: ``samples`` K defaults to
        the run's ``eval_samples`` for the test split and 0 (no -log p(x)) for the others, so the
        numbers equal ``results.json``'s for the run's own data."""
        config = self.config
        if samples is None:
            samples = config.eval_samples if split == "test" else 0
        return evaluate(
            self.model,
            self.images(split, path),
            batch_size=config.eval_batch_size,
            samples=samples,
            device=self.device,
            seed=config.seed,
            precision=config.precision,
            progress=progress,
            desc=f"{split} -log p(x), K={samples}",
        )


def _registered_split(name: str, split: str, data_dir: str | None, seed: int) -> torch.Tensor:
    """Split ``split`` of a registered data set as the trainer scores it (grayscale binarized once)."""
    return prepare_data(TrainConfig(dataset=name, data_dir=data_dir, seed=seed)).split(split)


def _kind_of(images: torch.Tensor) -> str:
    return "8bit" if images.dtype == torch.uint8 else "binary"


def run_config(path: str | Path) -> TrainConfig:
    """The configuration in a run directory's ``config.yaml``; one-line errors for anything else."""
    run = Path(path)
    if not run.exists():
        raise ConfigError(f"{run} is not a flowvae run directory (it does not exist)")
    if not run.is_dir():
        raise ConfigError(f"{run} is not a flowvae run directory (it is not a directory)")
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a flowvae run directory (no config.yaml)")
    return TrainConfig.from_dict(load_yaml(run / "config.yaml"), source=str(run / "config.yaml"))


def load_run(
    path: str | Path,
    checkpoint: str = "best",
    device: str | torch.device | None = None,
    *,
    model: LatentVariableModel | None = None,
    data_dir: str | None = None,
) -> TrainedRun:
    """Load the run in ``path``: its model with the ``'best'`` (``best.pt``) or ``'last'``
    (``checkpoint.pt``) weights on ``device`` (default: the run's), its config and results.

    A run trained on a model of your own needs that model: ``load_run(path, model=MyVAE(...))``
    loads the weights into it.  Runs written before flowvae recorded the image shape in its
    checkpoints read their data set once to learn it.

    Returns:
        A :class:`TrainedRun`: the model (in eval mode, on ``device``), the config, and what the run
        recorded (``results``, ``data``: the image shape and kind, ``device``, ``checkpoint``).

    Raises:
        ConfigError: not a run directory.
        CheckpointError: a missing, corrupt or foreign checkpoint, or weights of another model.
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    run = Path(path)
    config = run_config(run)
    if data_dir:
        config.data_dir = data_dir
    file = run / CHECKPOINTS[checkpoint]
    saved = load_checkpoint(file, config)
    data = saved.get("data")
    if not isinstance(data, dict):  # an older run: learn the shape and kind from its data set
        splits = prepare_data(config).splits
        data = splits.describe()
    if model is None:
        model = build_model(config.model, tuple(data["image_shape"]), data["kind"])
        recorded = data.get("model_class")
        if recorded is not None and recorded != model_class(model):
            raise CheckpointError(
                f"{run} was trained on a model of your own ({recorded}); load it with "
                f"flowvae.load_run({str(run)!r}, model=...)"
            )
    load_weights(model, saved["model"], file)
    target = resolve_device(str(device) if device is not None else config.device)
    results = None
    if (run / "results.json").is_file():
        try:
            results = json.loads((run / "results.json").read_text())
        except (ValueError, OSError) as err:
            raise ConfigError(f"{run}: results.json is unreadable ({err})") from None
    return TrainedRun(run, model.to(target).eval(), config, results, data, target, checkpoint)


def fit(
    config_or_model: TrainConfig | dict[str, Any] | LatentVariableModel | None = None,
    train: Any = None,
    valid: Any = None,
    test: Any = None,
    *,
    resume: bool = False,
    **options: Any,
) -> tuple[LatentVariableModel, TrainedRun]:
    """Train a model as ``flowvae train`` does and return ``(model, run)``.

    Args:
        config_or_model: a :class:`~flowvae.config.TrainConfig`, a mapping of its keys, a model of
            your own (a :class:`~flowvae.models.LatentVariableModel`, trained as it is), or None.
        train: images as a NumPy array or tensor ((N, H, W), (N, C, H, W) or (N, H, W, C)), or a
            path (folder, ``.npy``, ``.npz``); None: the config's ``dataset``.
        valid: validation images of the same shape; where missing, ``valid_fraction`` of
            ``train`` is held out (shuffled with ``seed``).
        test: test images of the same shape; where missing, ``test_fraction`` of ``train``.
        resume: continue the run in ``out`` (pass the same arrays again).
        **options: any config key (``out``, ``epochs``, ``flow``, ``data_kind``, ...), overriding
            ``config_or_model``'s.

    Returns:
        The trained model with its best weights (in eval mode), and the :class:`TrainedRun`
        (``run.results`` is ``results.json``).

    Raises:
        ConfigError, DataError: bad options or data, before anything is written.
    """
    model = config_or_model if isinstance(config_or_model, LatentVariableModel) else None
    if isinstance(config_or_model, TrainConfig):
        values = config_or_model.to_dict()
    elif isinstance(config_or_model, dict):
        values = TrainConfig.from_dict(config_or_model, source="fit").to_dict()
    elif config_or_model is None or model is not None:
        values = TrainConfig().to_dict()
    else:
        raise TypeError(
            f"fit() takes a TrainConfig, a dict or a LatentVariableModel, got {type(config_or_model).__name__}"
        )
    flat = TrainConfig.from_dict(values, source="fit").flat()
    config = TrainConfig.from_dict(flat | options, source="fit")
    splits: DatasetSplits | None = None
    if isinstance(train, (str, Path)):
        if valid is not None or test is not None:
            raise DataError("give valid and test inside the folder or .npz of train, not as arrays beside a path")
        config.dataset = str(train)
    elif train is not None:
        splits = splits_from_arrays(
            train,
            valid,
            test,
            kind=config.data_kind,
            valid_fraction=config.valid_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
            name=ARRAYS,
        )
        config = dataclasses.replace(config, dataset=ARRAYS)
    config.validate()
    train_run(config, resume=resume, splits=splits, model=model)
    run = load_run(config.out, model=model)
    run.splits = splits
    return run.model, run
