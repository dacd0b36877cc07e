"""Fashion-MNIST (Xiao et al., 2017): 50000/10000/10000, kind ``'grayscale'``.

Same IDX layout and split as :mod:`.mnist`. The image files are looked for first in
``/usr/share/datasets/fashion-mnist/`` (Debian/Ubuntu package ``dataset-fashion-mnist``, which
ships ``train-images-idx3-ubyte.gz`` and ``t10k-images-idx3-ubyte.gz``; the package recompresses
them, so they are checked by structure, not by the upstream checksums), then in
``<data_dir>/fashion_mnist/``, then downloaded from Zalando's server.

References:
    Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
    Learning Algorithms", arXiv:1708.07747, 2017.
"""

from __future__ import annotations

from pathlib import Path

from .mnist import load_idx_dataset
from .registry import DatasetSplits, register

__all__ = ["load_fashion_mnist"]

SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
BASE_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
# SHA-256 of the published .gz files, as listed by tensorflow-datasets
# (url_checksums/fashion_mnist.txt) and torchvision (prototype/datasets/_builtin/mnist.py).
CHECKSUMS: dict[str, str | None] = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
}
TRAIN_FILE_ROWS = 60_000
TEST_FILE_ROWS = 10_000
N_VALID = 10_000


@register("fashion_mnist")
def load_fashion_mnist(data_dir: Path, *, download: bool, seed: int) -> DatasetSplits:
    """Load Fashion-MNIST (grayscale, 50000/10000/10000); ``seed`` is unused."""
    return load_idx_dataset(
        "fashion_mnist",
        data_dir / "fashion_mnist",
        system_dirs=SYSTEM_DIRS,
        base_urls=BASE_URLS,
        checksums=CHECKSUMS,
        rows=(TRAIN_FILE_ROWS, TEST_FILE_ROWS),
        n_valid=N_VALID,
        download=download,
    )
