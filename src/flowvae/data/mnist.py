"""MNIST from the IDX files: 50000/10000/10000, kind ``'grayscale'`` (binarized dynamically).

The last 10000 images of the 60000-image training file are the validation set. Only the image
files are read (a VAE needs no labels). Files are looked for in ``<data_dir>/mnist/`` as
``train-images-idx3-ubyte.gz`` / ``t10k-images-idx3-ubyte.gz`` (SHA-256 checked) or as the
uncompressed ``train-images-idx3-ubyte`` / ``t10k-images-idx3-ubyte`` (structure checked), and
downloaded from the mirrors PyTorch and TensorFlow use. They live in a subdirectory because
Fashion-MNIST's files have the same names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .cache import fetch
from .errors import DataError
from .formats import read_idx
from .registry import DatasetSplits, register

__all__ = ["load_mnist", "load_idx_dataset"]

BASE_URLS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# SHA-256 of the published .gz files, as listed by tensorflow-datasets
# (url_checksums/mnist.txt) and torchvision (prototype/datasets/_builtin/mnist.py).
CHECKSUMS: dict[str, str | None] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
}
TRAIN_FILE_ROWS = 60_000  # images in the training file, validation set included
TEST_FILE_ROWS = 10_000
N_VALID = 10_000
IMAGE_SHAPE = (1, 28, 28)


def _locate(
    stem: str,
    cache_dir: Path,
    system_dirs: Sequence[Path],
    base_urls: Sequence[str],
    checksum: str | None,
    download: bool,
) -> Path:
    """Find ``stem`` (.gz or raw) in ``system_dirs``, then in ``cache_dir``, else download it.

    Files in ``system_dirs`` come from a package manager (which may recompress them) and are
    checked by structure only; a ``.gz`` in ``cache_dir`` is checked against ``checksum``.
    """
    for directory in system_dirs:
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                return candidate
    if not (cache_dir / f"{stem}.gz").is_file() and (cache_dir / stem).is_file():
        return cache_dir / stem
    urls = [base + f"{stem}.gz" for base in base_urls]
    return fetch(f"{stem}.gz", cache_dir, urls, checksum, download)


def load_idx_dataset(
    name: str,
    cache_dir: Path,
    *,
    system_dirs: Sequence[Path],
    base_urls: Sequence[str],
    checksums: Mapping[str, str | None],
    rows: tuple[int, int],
    n_valid: int,
    download: bool,
) -> DatasetSplits:
    """Load an MNIST-like pair of IDX image files as ``'grayscale'`` splits ``(N, 1, 28, 28)``.

    ``rows`` are the expected image counts of the training and test files; the last
    ``n_valid`` training images become the validation set.
    """
    images = {}
    for stem, n_rows in (("train-images-idx3-ubyte", rows[0]), ("t10k-images-idx3-ubyte", rows[1])):
        checksum = checksums.get(f"{stem}.gz")
        path = _locate(stem, cache_dir, system_dirs, base_urls, checksum, download)
        x = read_idx(path)
        expected = (n_rows, *IMAGE_SHAPE[1:])
        if x.shape != expected:
            raise DataError(f"{path}: images have shape {x.shape}, expected {expected}")
        images[stem] = x
    train, test = images["train-images-idx3-ubyte"], images["t10k-images-idx3-ubyte"]
    n_train = len(train) - n_valid
    return DatasetSplits.from_numpy(name, "grayscale", train[:n_train], train[n_train:], test, IMAGE_SHAPE)


@register("mnist")
def load_mnist(data_dir: Path, *, download: bool, seed: int) -> DatasetSplits:
    """Load MNIST (grayscale, 50000/10000/10000); ``seed`` is unused (the split is fixed)."""
    return load_idx_dataset(
        "mnist",
        data_dir / "mnist",
        system_dirs=(),
        base_urls=BASE_URLS,
        checksums=CHECKSUMS,
        rows=(TRAIN_FILE_ROWS, TEST_FILE_ROWS),
        n_valid=N_VALID,
        download=download,
    )
