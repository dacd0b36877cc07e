"""CIFAR-10 from the official python tarball: 45000/5000/10000, kind ``'8bit'``, (3, 32, 32).

Reads ``cifar-10-python.tar.gz`` from the data directory (SHA-256 checked), downloading it if
allowed. The batches inside are pickles; they are read straight from the archive, without
extracting it, by :class:`~flowvae.data.formats.NumpyOnlyUnpickler`, which can rebuild numpy
arrays and nothing else. The last 5000 images of the five training batches are the validation
set.

References:
    Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

import numpy as np

from .cache import fetch
from .errors import DataError
from .formats import read_cifar_batch
from .registry import DatasetSplits, register

__all__ = ["load_cifar10"]

TAR_NAME = "cifar-10-python.tar.gz"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# SHA-256 of the tarball as checked by torchvision (prototype/datasets/_builtin/cifar.py);
# the MD5 published with it (and checked by torchvision.datasets.CIFAR10) is
# c58f30108f718f92721af3b95e74349a.
TAR_SHA256: str | None = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
MEMBER_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
ROWS_PER_BATCH = 10_000
N_VALID = 5_000
IMAGE_SHAPE = (3, 32, 32)


def _read_batches(path: Path) -> dict[str, bytes]:
    """Bytes of each batch file in the tarball, read in one pass."""
    wanted = {f"{MEMBER_DIR}/{name}": name for name in (*TRAIN_BATCHES, TEST_BATCH)}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name)
                if name is None or not member.isfile():
                    continue
                stream = tar.extractfile(member)
                assert stream is not None  # regular files always have a stream
                found[name] = stream.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: truncated or not a valid tar.gz archive ({exc})") from None
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise DataError(f"{path}: missing {', '.join(f'{MEMBER_DIR}/{m}' for m in missing)}")
    return found


@register("cifar10")
def load_cifar10(data_dir: Path, *, download: bool, seed: int) -> DatasetSplits:
    """Load CIFAR-10 as uint8 ``(N, 3, 32, 32)``; ``seed`` is unused (the split is fixed)."""
    path = fetch(TAR_NAME, data_dir, URL, TAR_SHA256, download)
    raw = _read_batches(path)
    arrays = {}
    for name, data in raw.items():
        where = f"{path}:{MEMBER_DIR}/{name}"
        array = read_cifar_batch(data, where, row_size=int(np.prod(IMAGE_SHAPE)))
        if len(array) != ROWS_PER_BATCH:
            raise DataError(f"{where}: {len(array)} images, expected {ROWS_PER_BATCH}")
        arrays[name] = array
    train = np.concatenate([arrays[name] for name in TRAIN_BATCHES])
    n_train = len(train) - N_VALID
    return DatasetSplits.from_numpy(
        "cifar10", "8bit", train[:n_train], train[n_train:], arrays[TEST_BATCH], IMAGE_SHAPE
    )
