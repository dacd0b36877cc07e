"""Datasets as in-memory tensors: ``load_dataset(name) -> DatasetSplits``.

Files are looked for in ``data_dir`` (default ``$FLOWVAE_DATA`` or ``~/.cache/flowvae``) and
downloaded there, checksummed and atomically, when missing and allowed. Every problem with a
data file surfaces as one :class:`DataError` naming the file and what is wrong.

Examples:
    >>> from flowvae.data import load_dataset
    >>> splits = load_dataset("digits")
    >>> splits.kind, splits.image_shape, len(splits.train), len(splits.valid), len(splits.test)
    ('binary', (1, 8, 8), 1297, 250, 250)
"""

from .cache import default_data_dir
from .errors import DataError
from .registry import DatasetSplits, available_datasets, load_dataset, register

__all__ = [
    "DataError",
    "DatasetSplits",
    "available_datasets",
    "default_data_dir",
    "load_dataset",
    "register",
]
