"""Statically binarized MNIST (Larochelle & Murray, 2011): 50000/10000/10000, kind ``'binary'``.

Reads ``binarized_mnist.npz`` from the data directory when it is there (arrays ``train``,
``valid``, ``test``: uint8 in {0, 1}, ``(N, 784)``; SHA-256 checked); otherwise the official
text files ``binarized_mnist_{train,valid,test}.amat``, downloaded if allowed, SHA-256 checked
too, and their content checked: row counts, 784 columns, values in {0, 1}.

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
# SHA-256 of the official .amat files (78,400,000 / 15,680,000 / 15,680,000 bytes) as listed by
# tensorflow-datasets (url_checksums/binarized_mnist.txt); the same digests come out of writing
# binarized_mnist.npz's arrays back as text ("0 1 ... 0\n" per image), so both copies agree.
AMAT_SHA256 = {
    "train": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "valid": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "test": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}
OFFICIAL_ROWS = dict(SPLIT_ROWS)
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


def _amat_sha256(split: str) -> str | None:
    """The official file's digest; None when ``SPLIT_ROWS`` describes other files than the
    official ones (the tests' small copies), which are then checked by content only."""
    return AMAT_SHA256.get(split) if SPLIT_ROWS.get(split) == OFFICIAL_ROWS[split] else None


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
            path = fetch(name, data_dir, AMAT_URL.format(split=split), _amat_sha256(split), download)
            logger.info("parsing %s", path)
            try:
                splits[split] = _check(read_amat(path, N_PIXELS), str(path), split)
            except DataError as exc:
                raise DataError(f"{exc}; delete the file to download it again") from None
    return DatasetSplits.from_numpy(
        "binarized_mnist", "binary", splits["train"], splits["valid"], splits["test"], IMAGE_SHAPE
    )
