"""Statically binarized MNIST (Larochelle & Murray, 2011): 50000/10000/10000, kind ``'binary'``.

Reads ``binarized_mnist.npz`` from the data directory when it is there (arrays ``train``,
``valid``, ``test``: uint8 in {0, 1}, ``(N, 784)``; SHA-256 checked); otherwise the official
text files ``binarized_mnist_{train,valid,test}.amat``, downloaded if allowed. Their checksums
are unpublished, so their content is checked instead: row counts, 784 columns, values in {0, 1}.

References:
    Larochelle & Murray, "The Neural Autoregressive Distribution Estimator", AISTATS 2011.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .cache import fetch
from .errors import DataError
from .formats import read_amat, read_npz
from .registry import DatasetSplits, register

__all__ = ["load_binarized_mnist"]

logger = logging.getLogger(__name__)

NPZ_NAME = "binarized_mnist.npz"
NPZ_SHA256: str | None = "7a049ae3a0d88e964af4b41bbdb14e4303595e1c5de65f8bd2455cdcebb3514b"
AMAT_NAME = "binarized_mnist_{split}.amat"
AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{split}.amat"
SPLIT_ROWS = {"train": 50_000, "valid": 10_000, "test": 10_000}
IMAGE_SHAPE = (1, 28, 28)
N_PIXELS = 784


def _check(array: np.ndarray, where: str, split: str) -> np.ndarray:
    """Check one split ``(N, 784)`` of 0/1 values; return it as uint8."""
    expected = (SPLIT_ROWS[split], N_PIXELS)
    if array.shape != expected:
        raise DataError(f"{where}: {split!r} has shape {array.shape}, expected {expected}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise DataError(f"{where}: {split!r} has dtype {array.dtype}, expected uint8 in {{0, 1}}")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise DataError(f"{where}: {split!r} has values other than 0 and 1")
    return array.astype(np.uint8, copy=False)


@register("binarized_mnist")
def load_binarized_mnist(data_dir: Path, *, download: bool, seed: int) -> DatasetSplits:
    """Load the fixed binarization; ``seed`` is unused (the split is fixed). Images (1, 28, 28)."""
    npz = data_dir / NPZ_NAME
    if npz.is_file():
        fetch(NPZ_NAME, data_dir, None, NPZ_SHA256, download=False)
        arrays = read_npz(npz, list(SPLIT_ROWS))
        splits = {s: _check(a, str(npz), s) for s, a in arrays.items()}
    else:
        splits = {}
        for split in SPLIT_ROWS:
            name = AMAT_NAME.format(split=split)
            path = fetch(name, data_dir, AMAT_URL.format(split=split), None, download)
            logger.info("parsing %s", path)
            try:
                splits[split] = _check(read_amat(path, N_PIXELS), str(path), split)
            except DataError as exc:
                raise DataError(f"{exc}; delete the file to download it again") from None
    return DatasetSplits.from_numpy(
        "binarized_mnist", "binary", splits["train"], splits["valid"], splits["test"], IMAGE_SHAPE
    )
