"""The dataset registry: :class:`DatasetSplits`, :func:`register`, :func:`load_dataset`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..registry import Registry
from .cache import default_data_dir
from .values import KINDS, to_tensor

__all__ = [
    "DatasetSplits",
    "Loader",
    "register",
    "available_datasets",
    "load_dataset",
    "shuffled_split",
    "KINDS",
]

_KIND_DTYPE = {"binary": torch.float32, "grayscale": torch.float32, "8bit": torch.uint8}

# Modules whose import registers the built-in datasets; imported on first use of the registry.
_BUILTIN_MODULES = ("binarized_mnist", "mnist", "fashion_mnist", "freyfaces", "digits", "cifar10")


@dataclass(frozen=True, repr=False)
class DatasetSplits:
    """Train/valid/test images held in memory, each ``(N, C, H, W)``.

    ``kind`` says how to read the values: ``'binary'`` float32 in {0, 1}; ``'grayscale'``
    float32 in [0, 1], binarized by the trainer with a fresh Bernoulli sample per batch;
    ``'8bit'`` uint8 in 0..255.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; expected one of {KINDS}")
        shapes = {split: tuple(t.shape) for split, t in self._items()}
        if any(len(s) != 4 for s in shapes.values()):
            raise ValueError(f"{self.name}: splits must be (N, C, H, W), got {shapes}")
        if len({s[1:] for s in shapes.values()}) != 1:
            raise ValueError(f"{self.name}: splits have different image shapes {shapes}")
        dtype = _KIND_DTYPE[self.kind]
        bad = {split: t.dtype for split, t in self._items() if t.dtype != dtype}
        if bad:
            raise ValueError(f"{self.name}: kind {self.kind!r} needs {dtype}, got {bad}")

    def _items(self) -> list[tuple[str, torch.Tensor]]:
        return [("train", self.train), ("valid", self.valid), ("test", self.test)]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.train.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def dim(self) -> int:
        """``C * H * W``."""
        c, h, w = self.image_shape
        return c * h * w

    def describe(self) -> dict[str, Any]:
        """What a trained model needs to know about its data, without the data: name, kind,
        ``image_shape`` (C, H, W), channels and the split sizes (recorded in every checkpoint)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "image_shape": list(self.image_shape),
            "channels": self.image_shape[0],
            "sizes": {split: len(t) for split, t in self._items()},
        }

    def __repr__(self) -> str:
        sizes = "/".join(str(len(t)) for _, t in self._items())
        return (
            f"DatasetSplits(name={self.name!r}, kind={self.kind!r}, "
            f"image_shape={self.image_shape}, train/valid/test={sizes})"
        )

    @classmethod
    def from_numpy(
        cls,
        name: str,
        kind: str,
        train: np.ndarray,
        valid: np.ndarray,
        test: np.ndarray,
        image_shape: tuple[int, int, int],
    ) -> DatasetSplits:
        """Build splits from arrays ``(N, ...)`` holding ``prod(image_shape)`` values each.

        ``'binary'`` arrays hold 0/1; ``'grayscale'`` ones integers 0..255 (scaled to [0, 1] here)
        or floats in [0, 1] (kept); ``'8bit'`` ones integers 0..255 (kept as uint8).  Values that do
        not fit the kind, NaN and infinities raise :class:`~flowvae.data.DataError` naming the split.
        """

        def convert(x: np.ndarray, split: str) -> torch.Tensor:
            x = np.ascontiguousarray(x).reshape((len(x), *image_shape))
            if kind == "8bit" and x.dtype == np.uint8:
                return torch.from_numpy(x.copy() if not x.flags.writeable else x)
            return to_tensor(x, kind, where=f"{name} [{split}]")

        return cls(name, convert(train, "train"), convert(valid, "valid"), convert(test, "test"), kind)


def shuffled_split(x: np.ndarray, n_valid: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle ``x`` (N, ...) with ``numpy.random.default_rng(seed)``; split as train/valid/test.

    After the shuffle, the last ``n_test`` rows are the test set, the ``n_valid`` before them the
    validation set and the rest the training set.
    """
    order = np.random.default_rng(seed).permutation(len(x))
    n_train = len(x) - n_valid - n_test
    return x[order[:n_train]], x[order[n_train : n_train + n_valid]], x[order[n_train + n_valid :]]


class Loader(Protocol):
    """A dataset loader: ``loader(data_dir, download=..., seed=...) -> DatasetSplits``."""

    def __call__(self, data_dir: Path, *, download: bool, seed: int) -> DatasetSplits: ...


_REGISTRY: Registry[Loader] = Registry("dataset")
_builtins_imported = False


def register(name: str) -> Callable[[Loader], Loader]:
    """Decorator registering a loader under ``name`` (lower case; registering the same loader again is harmless)."""
    return _REGISTRY.register(name)


def _import_builtins() -> None:
    global _builtins_imported
    if not _builtins_imported:
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")
        _builtins_imported = True


def available_datasets() -> list[str]:
    """Sorted names accepted by :func:`load_dataset`."""
    _import_builtins()
    return sorted(_REGISTRY.names())


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    seed: int = 0,
) -> DatasetSplits:
    """Load dataset ``name`` from ``data_dir`` (default :func:`default_data_dir`).

    Args:
        name: a registered name (``-`` and ``_`` are interchangeable, case is ignored).
        data_dir: where files are looked for and downloaded to.
        download: whether missing files may be downloaded.
        seed: seeds the shuffle of datasets without a fixed split (freyfaces, digits).

    Raises:
        ValueError: unknown name.
        DataError: missing, corrupt, truncated or mismatched data files.
    """
    _import_builtins()
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return _REGISTRY[key](root, download=download, seed=seed)
